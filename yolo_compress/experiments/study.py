"""The study: distillation and pruning in the users' setting, run as DVC experiments from study.yaml.

    python -m yolo_compress.experiments.study [--parts digits pose] [--budget 150]  # run what has no record, report
    python -m yolo_compress.experiments.study --collect-only  # report from the committed records, run nothing

Each (part, schedule, loss, seed) is one `dvc exp run --temp` of the committed pipeline up to `distill`, with
study.yaml's overrides; it trains that seed's plain student too, and DVC's run cache shares the teacher and the
plain students between experiments. When the distill grid is done, the best distilled model of the longest
schedule (chosen on val; or each `prune_seeds` model of the best loss) goes through the `prune` stage once per
recipe of study.yaml, and the distillation time of each loss is measured side by side against plain training
(yolo_compress.experiments.distill_overhead) on the part's data.

The moment an experiment ends, its models are scored with pycocotools on val, test and test_shift, and its record
(yolo_compress.experiments.study_records) is written under reports/study_records/ and committed: a rerun, in this
session or a later one on another machine, runs only the experiments with no record of the same params and stage
code. `--budget` stops between experiments. The report, reports/study.md and reports/study.json, is built from the
records alone. It refuses to run from uncommitted code, because experiments run the last commit.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from yolo_compress import files
from yolo_compress.config import PRUNE_CONTROL, load_params
from yolo_compress.data.inputs import DATA_SOURCES, MODEL_STARTS
from yolo_compress.errors import ParamsError, UserError, stage_entrypoint
from yolo_compress.experiments.compare_distill import run_dvc
from yolo_compress.experiments.pretrain_starts import weights_sha256
from yolo_compress.experiments.study_experiment import WORK, Experiment, Scorer, finished_experiments, make_record
from yolo_compress.experiments.study_plan import (
    PLAIN,
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
from yolo_compress.experiments.study_records import (
    RECORDS,
    Budget,
    estimate_seconds,
    load_records,
    record_path,
    why_stale,
)
from yolo_compress.experiments.study_report import format_study

log = logging.getLogger("yolo_compress.experiments.study")
CODE = ("stages", "yolo_compress", "dvc.yaml", "params.yaml", "study.yaml")
CODE_ROOTS = ("stages/", "yolo_compress/")  # a stage's dependencies that are code, not data or models
TARGETS = ("distill", "prune")  # the stages study experiments run up to
USER_FOLDERS = (f"{DATA_SOURCES}/", f"{MODEL_STARTS}/")  # where the files params name must live


def check_committed(paths: Sequence[str] = CODE) -> None:
    """Refuse while code or params differ from the last commit: each experiment's results must be those of a commit
    (an experiment run with --temp would silently carry the uncommitted edits)."""
    out = subprocess.run(["git", "status", "--porcelain", "--", *paths], capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError("the study needs a git repository: run it from the project's clone")
    changed = [line[3:] for line in out.stdout.splitlines()]
    if changed:
        raise UserError(f"uncommitted changes in {', '.join(changed[:5])}: the study's experiments must come from a "
                        "commit that names their code; commit (or stash) them first")


def check_params(study: StudyConfig, parts: Sequence[str], config: str = "study.yaml") -> None:
    """Every experiment's params.yaml must load: a bad override stops here, before anything runs."""
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
            for key, value in overrides.items():
                if isinstance(value, str) and value.startswith(USER_FOLDERS) and not Path(value).exists():
                    raise ParamsError(f"{config}: {where}: {key}: {value} not found; {how_to_make(key, value)}")


def how_to_make(key: str, path: str) -> str:
    """What to do about an input a study part names and this machine lacks."""
    if key == "distill.unlabeled":
        return "make it with `python -m yolo_compress.experiments.unlabeled_digits`, or put your own images there"
    if path.startswith(f"{MODEL_STARTS}/"):
        return ("make the project's pretrained starts with `python -m yolo_compress.experiments.pretrain_starts`, "
                "or put your own file there")
    return "put your own files there"


def tree_changed(paths: Sequence[str]) -> bool:
    """True (with a warning) when code or params differ from the last commit: an experiment would run them.
    Checked again before the prune, which starts an hour or more after the grid."""
    try:
        check_committed(paths)
    except UserError as err:
        log.warning("prune not run: %s; then rerun the study", err)
        return True
    return False


def stage_code(target: str) -> dict[str, str]:
    """md5 (as dvc.lock has it) of every code dependency of `target` and of the stages it needs, and of each of
    those stages' command as dvc.yaml writes it: what a record's experiment must share with today's code."""
    from dvc.repo import Repo

    commands = (yaml.safe_load(Path("dvc.yaml").read_text()) or {}).get("stages", {})
    code = {}
    with Repo(".") as repo:
        for stage in repo.stage.collect(target, with_deps=True):
            code[f"{stage.addressing} (command)"] = hashlib.md5(
                str(commands.get(stage.addressing, {}).get("cmd", "")).encode()).hexdigest()
            for dep in stage.deps:
                if dep.def_path.startswith(CODE_ROOTS) and Path(dep.def_path).is_file():
                    code[dep.def_path] = hashlib.md5(Path(dep.def_path).read_bytes()).hexdigest()
    return code


def start_files(overrides: dict[str, Any]) -> list[str]:
    """The local inputs an experiment's overrides name by path: a pretrained start under models/start/, say, or a
    folder of unlabeled images under data/sources/; a bare name like yolo11s.yaml is Ultralytics' own."""
    return sorted({v for v in overrides.values() if isinstance(v, str) and "/" in v
                   and (v.endswith((".pt", ".yaml", ".yml")) or v.startswith(USER_FOLDERS))})


@functools.cache
def start_hash(path: str) -> str | None:
    """An input's identity: its weights' sha256 for a .pt (the file also holds its date), the md5 of a file, or of a
    folder's file names and bytes; None when it is not on this machine (it cannot be checked here)."""
    if Path(path).is_dir():
        digest = hashlib.md5()
        for f in sorted(f for f in Path(path).rglob("*") if f.is_file()):
            digest.update(f.relative_to(path).as_posix().encode())
            digest.update(f.read_bytes())
        return digest.hexdigest()
    if not Path(path).is_file():
        return None
    return weights_sha256(path) if path.endswith(".pt") else hashlib.md5(Path(path).read_bytes()).hexdigest()


def planned_code(p: Planned, code: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """What `p`'s record must share with today: the stage code up to its target, and each start file it names (a
    start trained again on another CPU type is another start)."""
    return {**code[p.target], **{f: start_hash(f) for f in start_files(p.overrides)}}


def reusable(p: Planned, records: dict[str, dict[str, Any]],
             code: dict[str, dict[str, str]]) -> tuple[dict[str, Any] | None, str | None]:
    """(`p`'s record if it matches today's params and code, else None; why an existing record does not match)."""
    record = records.get(p.name)
    why = None if record is None else why_stale(record, p, planned_code(p, code))
    return (record if why is None else None), why


def commit_files(paths: Sequence[Path], message: str) -> None:
    """Commit just these files (the rest of the index is left alone); a failure warns, the files stay written."""
    names = [str(p) for p in paths]
    add = subprocess.run(["git", "add", "--", *names], capture_output=True, text=True)
    done = add.returncode == 0 and subprocess.run(["git", "commit", "-q", "-m", message, "--", *names],
                                                  capture_output=True, text=True).returncode == 0
    if not done:
        log.warning("could not commit %s (git add / commit failed): commit it yourself, or a later session runs "
                    "the experiment again", ", ".join(names))


# -------------------------------------------------------------------------------------------------- running
def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def run_planned(planned: Sequence[Planned], study: StudyConfig, records: dict[str, dict[str, Any]],
                code: dict[str, dict[str, str]], budget: Budget, scorer: Scorer, code_commit: str,
                commit: bool) -> None:
    """Run, record and commit, one experiment at a time, each planned experiment without a current record."""
    params = yaml.safe_load(Path("params.yaml").read_text()) or {}
    todo = []
    for p in planned:
        record, why = reusable(p, records, code)
        if why is not None:
            log.warning("%s: its record is not reused, %s: it runs again", p.name, why)
        if record is None:
            todo.append(p)
    for p in todo:
        if budget.spent or not budget.allows(p, estimate_seconds(p, list(records.values()), params)):
            return
        if p.name in finished_experiments():  # an older run of the name (other params or code)
            run_dvc("exp", "remove", p.name)
        log.info("running %s (%d of %d to run)", p.name, todo.index(p) + 1, len(todo))
        budget.started += 1
        t0 = time.monotonic()
        copied = [arg for f in start_files(p.overrides) if Path(f).exists() for arg in ("-C", f)]  # ignored ones too
        proc = subprocess.run(["dvc", "exp", "run", "--temp", "--name", p.name, *copied, *set_arguments(p.overrides),
                               p.target])
        if proc.returncode != 0:
            log.warning("%s failed (exit %d; its output is above): no record, a rerun tries it again", p.name,
                        proc.returncode)
            continue
        exp = Experiment(p.name, finished_experiments()[p.name])
        records[p.name] = make_record(p, exp, study.parts[p.part], scorer, planned_code(p, code), code_commit)
        records[p.name]["seconds"] = round(time.monotonic() - t0, 1)  # scoring included: the budget pays for it
        path = record_path(p.name)
        files.write_json(path, records[p.name])
        if commit:
            commit_files([path], f"study: record of {p.name}")


# ---------------------------------------------------------------------------------------------- collecting
def current(p: Planned, records: dict[str, dict[str, Any]], code: dict[str, dict[str, str]],
            missing: list[str]) -> dict[str, Any] | None:
    """`p`'s record when it matches today's params and stage code; otherwise None, noted in `missing`."""
    record, why = reusable(p, records, code)
    if record is None:
        missing.append(p.name if why is None else f"{p.name} ({why})")
    return record


def collect_part(name: str, part: StudyPart, records: dict[str, dict[str, Any]],
                 code: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Everything the report says about one part, from its current records."""
    result: dict[str, Any] = {"schedules": {}, "missing": [], "teacher": None, "prune": {}, "commits": []}
    used: list[dict[str, Any]] = []
    for p in plan_part(name, part):
        record = current(p, records, code, result["missing"])
        if record is None:
            continue
        used.append(record)
        sched = result["schedules"].setdefault(p.schedule, {"epochs": part.schedules[p.schedule], "runs": {}})
        runs = sched["runs"]
        if p.seed not in runs.get(PLAIN, {}):
            runs.setdefault(PLAIN, {})[p.seed] = {
                "scores": record["scores"]["student"], "seconds_per_epoch": record["seconds_per_epoch"]["student"],
                "curve": record["curves"]["student"]}
        runs.setdefault(p.loss, {})[p.seed] = {
            "scores": record["scores"]["distilled"], "seconds_per_epoch": record["seconds_per_epoch"]["distilled"],
            "experiment": p.name}
        if result["teacher"] is None:
            result["teacher"] = {"scores": record["scores"]["teacher"], "curve": record["curves"]["teacher"],
                                 "gflops": record["gflops"]["teacher"], "student_gflops": record["gflops"]["student"]}
    pruned = to_prune(name, part, result)
    result["best"] = [best.name for best in pruned]
    for p in (p for best in pruned for p in plan_prune(name, part, best)):
        record = current(p, records, code, result["missing"])
        if record is not None:
            used.append(record)
            result["prune"].setdefault(p.recipe, {})[p.seed] = {
                "experiment": p.name, "overrides": part.prune[p.recipe], "metrics": record["prune"]["metrics"],
                "rounds": record["prune"]["rounds"], "scores": record["scores"]["pruned"],
                "distilled": record["scores"]["distilled"], "control": record["scores"].get(PRUNE_CONTROL)}
    # records are matched by name, params and stage code, whatever commit ran them: the report names those commits
    result["commits"] = sorted({str(r["commit"]) for r in used})
    overhead = overhead_table(part, used[0]) if used else None
    result["overhead"] = overhead.read_text() if overhead is not None and overhead.is_file() else None
    return result


def to_prune(name: str, part: StudyPart, result: dict[str, Any]) -> list[Planned]:
    """The distilled models of the longest schedule that the recipes prune (study_plan.models_to_prune)."""
    runs = result["schedules"].get(part.longest, {}).get("runs", {})
    return models_to_prune(name, part, {(loss, seed): r["scores"]["val"] for loss, by_seed in runs.items()
                                        if loss != PLAIN for seed, r in by_seed.items()})


# ------------------------------------------------------------------------------------------- timing tables
def overhead_path(data_md5: str, teacher_md5: str, params_text: str, losses: Sequence[str]) -> Path:
    """Where the timing table of these data, teacher, params and losses lives (committed beside the records),
    whatever part timed them: a resized part or a new loss is timed again, a renamed part is not."""
    key = hashlib.md5(f"{data_md5} {teacher_md5} {params_text} {' '.join(losses)}".encode()).hexdigest()[:12]
    return RECORDS / "overhead" / f"{key}.md"


def overhead_table(part: StudyPart, record: dict[str, Any]) -> Path:
    """The timing table's path for the data, teacher and params of a record's experiment and the part's losses."""
    return overhead_path(record["data_md5"], record["teacher_md5"], yaml.safe_dump(record["params"], sort_keys=True),
                         part.losses)


def measure_overhead(name: str, part: StudyPart, records: dict[str, dict[str, Any]],
                     code: dict[str, dict[str, str]], commit: bool) -> None:
    """Distillation time per epoch against plain training, side by side in one process, on the part's data and
    teacher (from its first current record whose experiment is still here); skipped when measured before."""
    firsts = [r for p in plan_part(name, part) if (r := current(p, records, code, [])) is not None]
    if not firsts or overhead_table(part, firsts[0]).is_file():
        return
    out, here = overhead_table(part, firsts[0]), finished_experiments()
    if firsts[0]["name"] not in here:
        log.info("%s: the side-by-side timing waits for a session that has run one of the part's experiments", name)
        return
    exp = Experiment(firsts[0]["name"], here[firsts[0]["name"]])
    params = WORK / name / "overhead_params.yaml"
    files.write_text(params, yaml.safe_dump(firsts[0]["params"], sort_keys=False))
    data = exp.fetch("data/prepared", WORK / "data" / exp.md5("data/prepared"))
    teacher = exp.fetch("models/teacher.pt", WORK / "models" / f"{exp.md5('models/teacher.pt')}.pt")
    log.info("%s: timing %s against plain training, side by side", name, " ".join(part.losses))
    proc = subprocess.run([sys.executable, "-m", "yolo_compress.experiments.distill_overhead", "--params", str(params),
                           "--data", str(data), "--teacher", str(teacher), "--losses", *part.losses, "--out", str(out)])
    if proc.returncode != 0:  # the report is still written, without this table; a rerun tries again
        log.warning("%s: the side-by-side timing failed (exit %d); see the output above", name, proc.returncode)
    elif commit:
        commit_files([out], f"study: distillation timing of part {name}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("study.yaml"))
    ap.add_argument("--parts", nargs="+", help="parts of study.yaml to run (default: all)")
    ap.add_argument("--budget", type=float, help="minutes: start no experiment that would end after this")
    ap.add_argument("--collect-only", action="store_true", help="report from the records, run nothing")
    ap.add_argument("--no-commit", dest="commit", action="store_false",
                    help="write records without committing them (a later session may then run them again)")
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
    if args.budget is not None and not args.budget > 0:
        raise UserError(f"--budget: expected minutes > 0, got {args.budget:g}")
    code_paths = (*CODE, str(args.config))  # a follow-up study's own config, too
    code = {target: stage_code(target) for target in TARGETS}
    records = load_records()
    if not args.collect_only:
        check_committed(code_paths)
        check_params(study, parts, str(args.config))
        budget, scorer, code_commit = Budget(args.budget), Scorer(), head_commit()
        run_planned([p for name in parts for p in plan_part(name, study.parts[name])], study, records, code, budget,
                    scorer, code_commit, args.commit)
        prunes = [p for name in parts for best in to_prune(name, study.parts[name],
                                                           collect_part(name, study.parts[name], records, code))
                  for p in plan_prune(name, study.parts[name], best)]
        if prunes and not budget.spent and not tree_changed(code_paths):
            run_planned(prunes, study, records, code, budget, scorer, code_commit, args.commit)
        for name in parts if not budget.spent else []:
            measure_overhead(name, study.parts[name], records, code, args.commit)
    # the report covers every part, so running one part does not drop the others' results
    collected = {}
    for name, part in study.parts.items():
        try:
            collected[name] = collect_part(name, part, records, code)
        except Exception as err:  # noqa: BLE001 - one part's broken record must not cost the other parts' report
            log.warning("%s: not collected (%s: %s); the other parts are reported", name, type(err).__name__, err)
            collected[name] = {"error": f"{type(err).__name__}: {err}"}
    text, summary = format_study(study, collected, head_commit(), args.config.as_posix())
    files.write_text(args.out, text)
    files.write_json(args.out.with_suffix(".json"), summary)
    print(text)
    print(f"written to {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
