"""Does the prune stage give the same verdict under what another machine changes? Run its rounds several times on the
same input, each under one perturbation that mimics another CPU, and compare the kept round.

    python -m yolo_compress.experiments.decision_stability [--variants as_is one_thread other_seed] \
        [--out reports/decision_stability.md]

Run in a pipeline workspace after `distill` (it reads params.yaml, data/prepared and prune.model). Variants:
- `as_is`: the prune stage's own settings;
- `one_thread`: pinned to one core (what `taskset -c 0` does), so torch runs 1 thread: float sums in another order;
- `other_seed`: the fine-tunes' data order from another seed (`student.seed` + 1).
Float results differ under each, as they do between CPUs; the verdict (rounds run, round kept) should not. Each
variant costs one prune stage (minutes on 2 cores); nothing is written under models/.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import load_params
from yolo_compress.devices import use_all_cores
from yolo_compress.errors import stage_entrypoint
from yolo_compress.experiments.prune_again import prune_again
from yolo_compress.models import load_model, set_checkpoint_trust

log = logging.getLogger("yolo_compress.experiments.decision_stability")
VARIANTS = ("as_is", "one_thread", "other_seed")


@contextmanager
def pinned_to_one_core(on: bool) -> Iterator[None]:
    """Within the block this process (and what it starts) may use its first core only, as under `taskset -c 0`."""
    if not on or not hasattr(os, "sched_setaffinity"):
        yield
        return
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    use_all_cores()
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)
        use_all_cores()


def verdict_table(verdicts: dict[str, dict[str, float]]) -> str:
    lines = ["# Prune decisions under perturbations", "",
             "Same input model and params; each row one perturbation that mimics another machine "
             "(`python -m yolo_compress.experiments.decision_stability`). Drops are the kept round's val mAP50-95 "
             "drop from the input, with its paired 95% bootstrap interval.", "",
             "| variant | rounds run | kept round | GFLOPs removed | kept round's drop |", "|---|---|---|---|---|"]
    for name, v in verdicts.items():
        lines.append(f"| {name} | {v['rounds_done']:.0f} | {v['kept']:.0f} | {v['gflops_removed']:.1%} | "
                     f"{v['drop']:+.4f} [{v['drop_ci95_low']:+.4f}, {v['drop_ci95_high']:+.4f}] |")
    same = len({(v["rounds_done"], v["kept"]) for v in verdicts.values()}) == 1
    lines += ["", "Same verdict under every perturbation." if same else "**The verdict differs between variants.**"]
    return "\n".join(lines) + "\n"


@stage_entrypoint
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("reports/decision_stability.md"))
    args = ap.parse_args(argv)
    params = load_params(args.params)
    set_checkpoint_trust(params.trust_checkpoints)
    use_all_cores()
    input_pt = Path(params.prune.model)
    task = load_model(input_pt, "prune.model").task
    teacher = params.prune.model if params.prune.teacher == "input" else params.distill.teacher
    distill = dataclasses.replace(params.distill, teacher=teacher) if params.prune.distill else None
    verdicts: dict[str, dict[str, float]] = {}
    for name in args.variants:
        student = params.student
        if name == "other_seed":
            student = dataclasses.replace(student, seed=params.student_seed + 1)
        run_params = dataclasses.replace(params, student=student)
        with pinned_to_one_core(name == "one_thread"), tempfile.TemporaryDirectory(prefix="rounds-") as rounds_dir:
            rows, keep, warnings = prune_again(run_params, args.data, input_pt, task, Path(rounds_dir),
                                               Path("runs") / "decision_stability" / name, distill)
        for warning in warnings:
            log.info("%s: %s", name, warning)
        kept = rows[keep]
        verdicts[name] = {"rounds_done": len(rows) - 1, "kept": keep, "gflops_removed": 1 - kept["gflops"] /
                          rows[0]["gflops"], **{k: kept[k] for k in ("drop", "drop_ci95_low", "drop_ci95_high")}}
        log.info("%s: %d round(s) run, round %d kept", name, len(rows) - 1, keep)
    table = verdict_table(verdicts)
    files.write_text(args.out, table)
    print(table, end="")


if __name__ == "__main__":
    sys.exit(main())
