"""Compare distillation losses over seeds, each (loss, seed) one DVC experiment of the `distill` target.

    python -m yolo_compress.experiments.compare_distill [--losses sl2 mgd cwd logit] [--seeds 0 1 2] [--jobs 1]
    python -m yolo_compress.experiments.compare_distill --collect-only      # just tabulate the existing experiments

Each experiment is `dvc exp run --queue --name <loss>-seed<seed>-<start> -S distill.loss=<loss> -S student.seed=<seed>
distill`; the `distill` target also runs train_student, which gives that seed's baseline student (the run cache reuses
it across losses). Queue states come from DVC's Python API and results from `dvc exp show --json`.
Per loss the table shows mAP50-95 over seeds, the paired gain over the same seed's plain student and over sl2
(Ultralytics' native distillation, the peer to beat), and time per epoch relative to plain training.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from dvc.repo import Repo

from yolo_compress import files
from yolo_compress.config import DISTILL_LOSSES
from yolo_compress.errors import UserError, stage_entrypoint

log = logging.getLogger("yolo_compress.experiments.compare_distill")

REFERENCE = "sl2"  # the peer every other loss must beat
STUDENT_METRICS, DISTILL_METRICS, PARAMS_FILE = "metrics/student.json", "metrics/distill.json", "params.yaml"
PENDING = ("Queued", "Running")  # queue states (see queue_status) that are not finished


@dataclass(frozen=True)
class Record:
    """One finished experiment: a distilled student and the same seed's plain student."""

    name: str
    loss: str
    seed: int
    student_map: float  # metrics/student.json val.map50_95
    distill_map: float  # metrics/distill.json val.map50_95
    student_spe: float  # plain training seconds per epoch
    distill_spe: float  # distillation seconds per epoch
    timestamp: str = ""


@dataclass(frozen=True)
class Row:
    """One loss's line of the table; each (mean, std) is over seeds, `None` where nothing can be paired."""

    loss: str
    seeds: list[int]
    map50_95: tuple[float, float]
    gain_vs_student: tuple[float, float]
    gain_vs_reference: tuple[float, float] | None
    time_ratio: tuple[float, float]


# ------------------------------------------------------------------------------------------------------ pure math
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the std of a single value is 0."""
    if not values:
        raise ValueError("mean_std: no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def latest_per_run(records: Iterable[Record]) -> list[Record]:
    """One record per (loss, seed): a repeated experiment replaces the older one."""
    best: dict[tuple[str, int], Record] = {}
    for r in records:
        key = (r.loss, r.seed)
        if key not in best or r.timestamp > best[key].timestamp:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r.loss, r.seed))


def summarize(records: Iterable[Record], reference: str = REFERENCE) -> tuple[list[Row], tuple[float, float]]:
    """Per-loss rows (in DISTILL_LOSSES order, unknown losses last) and the baseline student's (mean, std).

    Gains are paired by seed: mean and std of (distilled - plain student) and of (loss - reference) over the seeds
    both have, so seed-to-seed spread common to both cancels.
    """
    runs = latest_per_run(records)
    if not runs:
        raise ValueError("summarize: no records")
    by_loss: dict[str, dict[int, Record]] = {}
    for r in runs:
        by_loss.setdefault(r.loss, {})[r.seed] = r
    ref = by_loss.get(reference, {})
    students = {r.seed: r.student_map for r in runs}  # one baseline per seed, whichever loss carried it
    order = sorted(by_loss, key=lambda m: (DISTILL_LOSSES.index(m) if m in DISTILL_LOSSES else len(DISTILL_LOSSES), m))
    rows = []
    for loss in order:
        seeds = sorted(by_loss[loss])
        rs = [by_loss[loss][s] for s in seeds]
        paired = [s for s in seeds if s in ref]
        rows.append(Row(
            loss=loss,
            seeds=seeds,
            map50_95=mean_std([r.distill_map for r in rs]),
            gain_vs_student=mean_std([r.distill_map - r.student_map for r in rs]),
            gain_vs_reference=(mean_std([by_loss[loss][s].distill_map - ref[s].distill_map for s in paired])
                               if paired and loss != reference else None),
            time_ratio=mean_std([r.distill_spe / r.student_spe if r.student_spe > 0 else float("nan") for r in rs]),
        ))
    return rows, mean_std([students[s] for s in sorted(students)])


def _pm(ms: tuple[float, float] | None, fmt: str = "{:+.4f}") -> str:
    return "-" if ms is None else f"{fmt.format(ms[0])} ± {ms[1]:.4f}"


def format_table(rows: Sequence[Row], student: tuple[float, float], reference: str = REFERENCE,
                 skipped: Sequence[str] = ()) -> str:
    """The comparison as a Markdown table (mAP50-95 as a fraction; ± is the std over seeds)."""
    seeds = sorted({s for r in rows for s in r.seeds})
    lines = [
        "# Distillation losses compared",
        "",
        f"Plain student (baseline), val mAP50-95: {_pm(student, '{:.4f}')} (seeds {' '.join(map(str, seeds))}). "
        "± is the std over seeds; gains are paired by seed (mean ± std of the per-seed differences).",
        "",
        f"| loss | seeds | val mAP50-95 | gain vs student | gain vs {reference} | time/epoch vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.loss} | {' '.join(map(str, r.seeds))} | {_pm(r.map50_95, '{:.4f}')} "
                     f"| {_pm(r.gain_vs_student)} | {_pm(r.gain_vs_reference)} "
                     f"| {r.time_ratio[0]:.2f}x ± {r.time_ratio[1]:.2f} |")
    if skipped:
        lines += ["", f"Not counted (failed, queued or incomplete): {', '.join(skipped)}. "
                  "See `dvc queue logs <name>`."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- dvc exp show
def _metric(metrics: dict[str, Any], path: str, section: str, key: str) -> float | None:
    value = (metrics.get(path) or {}).get("data", {}).get(section, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_exp_show(shown: list[dict[str, Any]]) -> tuple[list[Record], list[str]]:
    """Records from `dvc exp show --json` (DVC 3.x shape), and the names of experiments without results.

    Only experiments count (entries under a baseline's `experiments`), not the workspace or the commits.
    """
    records: list[Record] = []
    skipped: list[str] = []
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            rev = (exp.get("revs") or [{}])[0]
            name = exp.get("name") or rev.get("name") or rev.get("rev", "?")[:7]
            data = rev.get("data") or {}
            params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
            metrics = data.get("metrics") or {}
            values = [_metric(metrics, STUDENT_METRICS, "val", "map50_95"),
                      _metric(metrics, DISTILL_METRICS, "val", "map50_95"),
                      _metric(metrics, STUDENT_METRICS, "train", "seconds_per_epoch"),
                      _metric(metrics, DISTILL_METRICS, "train", "seconds_per_epoch")]
            loss = (params.get("distill") or {}).get("loss")
            seed = (params.get("student") or {}).get("seed")
            seed = params.get("seed", 0) if seed is None else seed  # null student.seed = the global seed
            if rev.get("error") or loss is None or any(v is None for v in values):
                skipped.append(str(name))
                continue
            records.append(Record(str(name), str(loss), int(seed), *values, timestamp=data.get("timestamp") or ""))
    return records, skipped


# ------------------------------------------------------------------------------------------------------ dvc calls
def run_dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"dvc {' '.join(args)} failed (exit {proc.returncode}): {last}")
    return proc.stdout


def _check_committed() -> None:
    # Queued experiments start from the last commit plus tracked changes; untracked code never reaches them.
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "stages", "yolo_compress",
                          "dvc.yaml", PARAMS_FILE], capture_output=True, text=True).stdout.split()
    if out:
        raise UserError(f"untracked files are not copied into queued DVC experiments: {', '.join(out)}; "
                        "commit them first")


def grid_overrides(loss: str, seed: int, workspace_seed: int | None, global_seed: int) -> list[str]:
    """`-S` overrides of one experiment. The workspace's own seed is left unset: writing `student.seed=0` over a
    null that already means 0 would change the params hash and retrain that seed's student for nothing."""
    overrides = [f"distill.loss={loss}"]
    if not (workspace_seed is None and seed == global_seed):
        overrides.append(f"student.seed={seed}")
    return overrides


def experiment_name(loss: str, seed: int, started: str) -> str:
    """The name this grid gives the experiment of (loss, seed); `started` (the grid's start time) keeps reruns apart."""
    return f"{loss}-seed{seed}-{started}"


def queue_grid(losses: Sequence[str], seeds: Sequence[int]) -> list[str]:
    """Queue one experiment per (loss, seed) under a name of ours (nothing to read back from DVC); return the names."""
    # Only the two seeds are needed: read them raw, so a pipeline with other sections can be compared too.
    params = yaml.safe_load(Path(PARAMS_FILE).read_text()) or {}
    workspace_seed, global_seed = (params.get("student") or {}).get("seed"), params.get("seed", 0)
    started = time.strftime("%Y%m%d-%H%M%S")
    names = []
    for loss in losses:
        for seed in seeds:
            sets = [a for o in grid_overrides(loss, seed, workspace_seed, global_seed) for a in ("-S", o)]
            names.append(experiment_name(loss, seed, started))
            run_dvc("exp", "run", "--queue", "--name", names[-1], *sets, "distill")
            log.info("queued %s: distill.loss=%s student.seed=%d", names[-1], loss, seed)
    return names


def queue_status(root: str | Path = ".") -> tuple[dict[str, str], int]:
    """Experiment name -> state (Queued, Running, Success, Failed) in the DVC queue of the repo at `root`, and the
    number of active workers: what `dvc queue status` prints (it has no --json), read through DVC's Python API."""
    with Repo(str(root)) as repo:
        queue = repo.experiments.celery_queue
        states: dict[str, str] = {}
        for task in queue.status():  # a name queued again after a failure is listed twice: the pending entry wins
            if task.get("name") and states.get(task["name"]) not in PENDING:
                states[task["name"]] = task["status"]
        active = sum(1 for tasks in queue.worker_status().values() if tasks)
    return states, active


def wait_for(names: Sequence[str], poll_s: float = 30.0, jobs: int = 1) -> None:
    """Block until none of `names` is queued or running; restart the workers if they vanished with work queued."""
    stalled = 0  # consecutive polls with work queued and no worker: two in a row, not a worker just starting up
    while True:
        states, active = queue_status()
        pending = [n for n in names if states.get(n) in PENDING]
        if not pending:
            return
        idle = active == 0 and all(states[n] == "Queued" for n in pending)
        stalled = stalled + 1 if idle else 0
        if stalled >= 2:
            # seen in a long grid: the worker exited with experiments still queued, which would wait forever
            stalled = 0
            log.warning("no DVC queue worker is running but %d experiments are queued: starting workers again",
                        len(pending))
            run_dvc("queue", "start", "-j", str(jobs))
        log.info("%d of %d experiments still queued or running", len(pending), len(names))
        time.sleep(poll_s)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", choices=DISTILL_LOSSES, default=list(DISTILL_LOSSES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=1, help="parallel queue workers (each trains on all cores)")
    ap.add_argument("--collect-only", action="store_true", help="tabulate existing experiments, run nothing")
    ap.add_argument("--out", type=Path, default=Path("reports/distill_comparison.md"))
    ap.add_argument("--poll", type=float, default=30.0, help="seconds between queue status checks")
    return ap.parse_args(argv)


@stage_entrypoint
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.collect_only:
        _check_committed()
        names = queue_grid(args.losses, args.seeds)
        run_dvc("queue", "start", "-j", str(args.jobs))
        wait_for(names, args.poll, args.jobs)
    records, skipped = parse_exp_show(json.loads(run_dvc("exp", "show", "--json")))
    wanted = [r for r in records if r.loss in args.losses and r.seed in args.seeds]
    if not wanted:
        raise UserError(f"no finished distill experiments for losses {args.losses} and seeds {args.seeds}; "
                        "run without --collect-only first, or see `dvc queue status`")
    rows, student = summarize(wanted)
    table = format_table(rows, student, skipped=skipped)
    files.write_text(args.out, table)
    print(table)
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
