"""The study: distillation and pruning in the users' setting, run as DVC experiments from study.yaml.

    python -m yolo_compress.experiments.study [--parts digits pose] [--jobs 1]  # queue what is missing, wait, report
    python -m yolo_compress.experiments.study --collect-only  # report what has finished, run nothing

Each (part, schedule, loss, seed) is one `dvc exp run --queue` of the committed pipeline up to `distill`, with
study.yaml's overrides; it trains that seed's plain student too, and DVC's run cache shares the teacher and the
plain students between experiments. When the distill grid is done, the best distilled model of the longest
schedule (chosen on val; or each `prune_seeds` model of the best loss) goes through the `prune` stage once per
recipe of study.yaml, and the distillation time of each loss is measured side by side against plain training
(yolo_compress.experiments.distill_overhead) on the part's data.
Every model is then scored with pycocotools on val, test and test_shift, from the experiment's own outputs in the
DVC cache. Writes reports/study.md and reports/study.json.

Resumable: finished experiments (by name) are kept, queued or running ones are waited for, failed or missing ones
are queued again; scores are cached in .study/ by model and data hash. It refuses to run from uncommitted code,
because queued experiments run the last commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from dvc.api import DVCFileSystem

from yolo_compress import files
from yolo_compress.config import load_params
from yolo_compress.data.prepared import load_summary, training_view
from yolo_compress.errors import ParamsError, UserError, stage_entrypoint
from yolo_compress.experiments.compare_distill import PENDING, queue_status, run_dvc, wait_for
from yolo_compress.experiments.study_plan import (
    PLAIN,
    SPLITS,
    Planned,
    StudyConfig,
    StudyPart,
    apply_overrides,
    load_study,
    models_to_prune,
    plan_part,
    plan_prune,
    set_arguments,
)
from yolo_compress.experiments.study_report import format_study
from yolo_compress.measure.evaluation import evaluate_split_with_predictions

log = logging.getLogger("yolo_compress.experiments.study")
WORK = Path(".study")  # scratch: fetched data and models, score cache, overhead tables (git-ignored)
# What the pipeline did before params.yaml had the key: experiments made then match a recipe that sets it so.
PARAMS_BEFORE_THE_KEY = {"prune.activation": "keep", "distill.kpt_weight": 1.0}
CODE = ("stages", "yolo_compress", "dvc.yaml", "params.yaml", "study.yaml")


def check_committed(paths: Sequence[str] = CODE) -> None:
    """Refuse while code or params differ from the last commit: each experiment's results must be those of a commit
    (a queued experiment would silently carry the uncommitted edits)."""
    out = subprocess.run(["git", "status", "--porcelain", "--", *paths], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError("the study needs a git repository: run it from the project's clone")
    changed = [line[3:] for line in out.stdout.splitlines()]
    if changed:
        raise UserError(f"uncommitted changes in {', '.join(changed[:5])}: the study's experiments must come from a "
                        "commit that names their code; commit (or stash) them first")


def check_params(study: StudyConfig, parts: Sequence[str], config: str = "study.yaml") -> None:
    """Every experiment's params.yaml must load: a bad override stops here, before anything is queued."""
    base = yaml.safe_load(Path("params.yaml").read_text()) or {}
    for name in parts:
        part = study.parts[name]
        checks = [(f"parts.{name}.params", p.overrides) for p in plan_part(name, part)]
        checks += [(f"parts.{name}.prune.{recipe}", {**part.params, **overrides})
                   for recipe, overrides in part.prune.items()]
        for where, overrides in checks:
            path = WORK / name / "params.yaml"
            files.write_text(path, yaml.safe_dump(apply_overrides(base, overrides), sort_keys=False))
            try:
                load_params(path)
            except ParamsError as err:
                raise ParamsError(f"{config}: {where}: {str(err).split(': ', 1)[1]}") from None


def tree_changed_for_queue(paths: Sequence[str]) -> bool:
    """True (with a warning) when code or params differ from the last commit: a queued experiment would run them.
    Checked again before the prune, which is queued an hour or more after the grid."""
    try:
        check_committed(paths)
    except UserError as err:
        log.warning("prune not queued: %s; then rerun the study", err)
        return True
    return False


def finished_experiments() -> dict[str, str]:
    """Name -> commit of every finished DVC experiment here (any baseline; the newest wins)."""
    out = subprocess.run(["git", "for-each-ref", "--sort=committerdate", "--format=%(refname) %(objectname)",
                          "refs/exps"], capture_output=True, text=True, check=True).stdout
    # refs/exps/<baseline[:2]>/<baseline[2:]>/<name>; DVC's own refs (refs/exps/celery/stash, ...) are shorter
    return {ref.split("/")[4]: sha for ref, sha in (line.split() for line in out.splitlines())
            if ref.count("/") == 4}


def params_differ(exp: Experiment, overrides: dict[str, Any]) -> list[str]:
    """The dotted keys whose value in the experiment's params.yaml is not the one planned (study.yaml changed)."""
    return keys_that_differ(yaml.safe_load(exp.fs.read_text("params.yaml")) or {}, overrides)


def keys_that_differ(params: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """`overrides`' dotted keys whose value in `params` differs, as "key old -> new"; a key added to params.yaml
    after an experiment ran reads as the behaviour it had then (`PARAMS_BEFORE_THE_KEY`)."""
    differ = []
    for key, value in overrides.items():
        node: Any = params
        for k in key.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            node = PARAMS_BEFORE_THE_KEY.get(key)
        if node != value:
            differ.append(f"{key} {node!r} -> {value!r}")
    return differ


def run_queue(planned: Sequence[Planned], jobs: int, poll_s: float) -> None:
    """Queue the experiments that have neither finished nor are waiting, start the workers, wait for all."""
    if not planned:
        return
    done, (states, _) = finished_experiments(), queue_status()
    for p in planned:
        if p.name in done:
            differ = params_differ(Experiment(p.name, done[p.name]), p.overrides)
            if differ:
                raise UserError(f"experiment {p.name} exists with other params ({'; '.join(differ[:3])}): "
                                f"remove it (`dvc exp remove {p.name}`) to run it again, or rename the part")
            continue
        if states.get(p.name) in PENDING:
            continue
        run_dvc("exp", "run", "--queue", "--name", p.name, *set_arguments(p.overrides), p.target)
        log.info("queued %s", p.name)
    run_dvc("queue", "start", "-j", str(jobs))
    wait_for([p.name for p in planned], poll_s, jobs)


# ----------------------------------------------------------------------------------------- reading experiments
class Experiment:
    """A finished experiment's files, read from git and the DVC cache at its commit."""

    def __init__(self, name: str, rev: str) -> None:
        self.name, self.rev, self.fs = name, rev, DVCFileSystem(".", rev=rev)

    @property
    def code_commit(self) -> str:
        """The commit the experiment ran (its baseline: the experiment commit's parent), short."""
        return subprocess.run(["git", "rev-parse", "--short", f"{self.rev}^"], capture_output=True, text=True,
                              check=True).stdout.strip()

    def json(self, path: str) -> Any:
        return json.loads(self.fs.read_text(path))

    def md5(self, path: str) -> str:
        return str(self.fs.info(path)["md5"])

    def fetch(self, path: str, dst: Path) -> Path:
        """A local copy of a tracked output, kept under its hash (fetched once)."""
        if not dst.exists():
            tmp = dst.with_name(dst.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            self.fs.get(path, str(tmp), recursive=self.fs.isdir(path))
            tmp.rename(dst)
        return dst


class Scorer:
    """pycocotools scores of a model on the prepared splits, cached by model hash, data hash and settings."""

    def __init__(self, cache: Path = WORK / "scores.json") -> None:
        self.path = cache
        self.cache: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.is_file() else {}

    def score(self, exp: Experiment, model: str, metric: str) -> dict[str, float]:
        text = exp.fs.read_text("params.yaml")
        evaluate = json.dumps((yaml.safe_load(text) or {}).get("evaluate"), sort_keys=True)
        data_md5, model_md5 = exp.md5("data/prepared"), exp.md5(model)
        key = f"{model_md5}:{data_md5}:{evaluate}:{metric}"
        if key not in self.cache:
            path = WORK / "exp_params.yaml"
            files.write_text(path, text)
            ev = load_params(path).evaluate
            data = exp.fetch("data/prepared", WORK / "data" / data_md5)
            pt = exp.fetch(model, WORK / "models" / f"{model_md5}.pt")
            scores = {}
            for split in [s for s in SPLITS if s in load_summary(data)["images"]]:  # your data may lack test_shift
                view = training_view(data, WORK / "views" / data_md5 / split, split=split)
                result, _ = evaluate_split_with_predictions(pt, view, ev.imgsz, conf=ev.conf, iou=ev.iou,
                                                            batch=ev.batch)
                scores[split] = float(result.get(metric, 0.0))  # a pose model without detections has no pose keys
            log.info("%s %s: %s", exp.name, model, "  ".join(f"{s} {v:.4f}" for s, v in scores.items()))
            self.cache[key] = scores
            files.write_json(self.path, self.cache)
        return self.cache[key]


def finished(p: Planned, done: dict[str, str], missing: list[str]) -> Experiment | None:
    """The finished experiment of `p`, or None (noted in `missing`) when it has not run or ran other params."""
    if p.name not in done:
        missing.append(p.name)
        return None
    exp = Experiment(p.name, done[p.name])
    if params_differ(exp, p.overrides):
        missing.append(f"{p.name} (ran with other params than study.yaml's)")
        return None
    return exp


def collect_part(name: str, part: StudyPart, scorer: Scorer) -> dict[str, Any]:
    """Everything the report says about one part, from the finished experiments."""
    done = finished_experiments()
    result: dict[str, Any] = {"schedules": {}, "missing": [], "teacher": None, "prune": {}, "commits": []}
    used: list[Experiment] = []
    for p in plan_part(name, part):
        exp = finished(p, done, result["missing"])
        if exp is None:
            continue
        used.append(exp)
        sched = result["schedules"].setdefault(p.schedule, {"epochs": part.schedules[p.schedule], "runs": {}})
        runs = sched["runs"]
        student, distilled = exp.json("metrics/student.json"), exp.json("metrics/distill.json")
        if p.seed not in runs.get(PLAIN, {}):
            curve = [row.get(part.metric, 0.0) for row in exp.json("plots/train_student.json")]
            runs.setdefault(PLAIN, {})[p.seed] = {
                "scores": scorer.score(exp, "models/student.pt", part.metric),
                "seconds_per_epoch": student["train"]["seconds_per_epoch"], "curve": curve}
        runs.setdefault(p.loss, {})[p.seed] = {
            "scores": scorer.score(exp, "models/distilled.pt", part.metric),
            "seconds_per_epoch": distilled["train"]["seconds_per_epoch"], "experiment": p.name}
        if result["teacher"] is None:
            result["teacher"] = {"scores": scorer.score(exp, "models/teacher.pt", part.metric),
                                 "curve": [row.get(part.metric, 0.0) for row in exp.json("plots/train_teacher.json")],
                                 "gflops": exp.json("metrics/teacher.json")["model"]["gflops"],
                                 "student_gflops": student["model"]["gflops"]}
    pruned = to_prune(name, part, result)
    result["best"] = [best.name for best in pruned]
    for p in (p for best in pruned for p in plan_prune(name, part, best)):
        exp = finished(p, done, result["missing"])
        if exp is not None:
            used.append(exp)
            result["prune"].setdefault(p.recipe, {})[p.seed] = {
                "experiment": exp.name, "overrides": part.prune[p.recipe],
                "metrics": exp.json("metrics/prune.json"), "rounds": exp.json("plots/prune.json"),
                "scores": scorer.score(exp, "models/pruned.pt", part.metric),
                "distilled": scorer.score(exp, "models/distilled.pt", part.metric)}
    # experiments are found by name, whatever commit ran them: the report names those commits
    result["commits"] = sorted({exp.code_commit for exp in used})
    source = overhead_source(name, part)
    overhead = overhead_table(part, source) if source is not None else None
    result["overhead"] = overhead.read_text() if overhead is not None and overhead.is_file() else None
    return result


def to_prune(name: str, part: StudyPart, result: dict[str, Any]) -> list[Planned]:
    """The distilled models of the longest schedule that the recipes prune (study_plan.models_to_prune)."""
    runs = result["schedules"].get(part.longest, {}).get("runs", {})
    return models_to_prune(name, part, {(loss, seed): r["scores"]["val"] for loss, by_seed in runs.items()
                                        if loss != PLAIN for seed, r in by_seed.items()})


def overhead_source(name: str, part: StudyPart) -> Experiment | None:
    """The part's first finished experiment: its data, teacher and params are what the timing runs on."""
    done = finished_experiments()
    first = next((p for p in plan_part(name, part) if p.name in done), None)
    return None if first is None else Experiment(first.name, done[first.name])


def overhead_path(data_md5: str, teacher_md5: str, params_text: str, losses: Sequence[str]) -> Path:
    """Where the timing table of these data, teacher, params and losses lives, whatever part timed them: a resized
    part or a new loss is timed again, a renamed part is not."""
    key = hashlib.md5(f"{data_md5} {teacher_md5} {params_text} {' '.join(losses)}".encode()).hexdigest()[:12]
    return WORK / "overhead" / f"{key}.md"


def overhead_table(part: StudyPart, exp: Experiment) -> Path:
    """The timing table's path for the data, teacher and params of `exp` and the part's losses."""
    return overhead_path(exp.md5("data/prepared"), exp.md5("models/teacher.pt"), exp.fs.read_text("params.yaml"),
                         part.losses)


def measure_overhead(name: str, part: StudyPart) -> None:
    """Distillation time per epoch against plain training, side by side in one process, on the part's data and
    teacher (from its first finished experiment); skipped when measured before on the same ones."""
    exp = overhead_source(name, part)
    if exp is None:
        return
    out = overhead_table(part, exp)
    if out.is_file():
        return
    params = WORK / name / "overhead_params.yaml"
    files.write_text(params, exp.fs.read_text("params.yaml"))
    data = exp.fetch("data/prepared", WORK / "data" / exp.md5("data/prepared"))
    teacher = exp.fetch("models/teacher.pt", WORK / "models" / f"{exp.md5('models/teacher.pt')}.pt")
    log.info("%s: timing %s against plain training, side by side", name, " ".join(part.losses))
    proc = subprocess.run([sys.executable, "-m", "yolo_compress.experiments.distill_overhead", "--params", str(params),
                           "--data", str(data), "--teacher", str(teacher), "--losses", *part.losses, "--out", str(out)])
    if proc.returncode != 0:  # the report is still written, without this table; a rerun tries again
        log.warning("%s: the side-by-side timing failed (exit %d); see the output above", name, proc.returncode)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("study.yaml"))
    ap.add_argument("--parts", nargs="+", help="parts of study.yaml to run (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="queue workers; more than 1 only for correctness checks")
    ap.add_argument("--collect-only", action="store_true", help="report the finished experiments, run nothing")
    ap.add_argument("--poll", type=float, default=60.0, help="seconds between queue status checks")
    ap.add_argument("--out", type=Path, default=Path("reports/study.md"))
    return ap.parse_args(argv)


@stage_entrypoint
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    study = load_study(args.config)
    parts = args.parts or list(study.parts)
    unknown = [p for p in parts if p not in study.parts]
    if unknown:
        raise UserError(f"--parts: {unknown[0]!r} is not in {args.config} (it has {', '.join(study.parts)})")
    code = (*CODE, str(args.config))  # a follow-up study's own config, too
    if not args.collect_only:
        check_committed(code)
        check_params(study, parts, str(args.config))
        run_queue([p for name in parts for p in plan_part(name, study.parts[name])], args.jobs, args.poll)
    scorer = Scorer()
    if not args.collect_only:
        prunes = []
        for name in parts:
            part = study.parts[name]
            prunes += [p for best in to_prune(name, part, collect_part(name, part, scorer))
                       for p in plan_prune(name, part, best)]
        if prunes and tree_changed_for_queue(code):
            prunes = []
        run_queue(prunes, args.jobs, args.poll)
        for name in parts:
            measure_overhead(name, study.parts[name])
    # the report covers every part, so running one part does not drop the others' results
    collected = {}
    for name, part in study.parts.items():
        try:
            collected[name] = collect_part(name, part, scorer)
        except Exception as err:  # noqa: BLE001 - one part's broken file must not cost the other parts' report
            log.warning("%s: not collected (%s: %s); the other parts are reported", name, type(err).__name__, err)
            collected[name] = {"error": f"{type(err).__name__}: {err}"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text, summary = format_study(study, collected, commit, args.config.as_posix())
    files.write_text(args.out, text)
    files.write_json(args.out.with_suffix(".json"), summary)
    print(text)
    print(f"written to {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
