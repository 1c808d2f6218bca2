"""Distillation time overhead: plain student training and each loss, side by side in one process on the same data.

    python -m yolo_compress.experiments.distill_overhead [--losses sl2 mgd cwd logit] [--rounds 2] [--epochs 1]

Run in a pipeline workspace after train_teacher (it reads params.yaml's student/distill sections, data/prepared and
models/teacher.pt). Each round trains the plain student and every loss for `--epochs` epochs, in an order rotated
per round, so drift in machine load hits every method alike. Per method the table gives the train-loop seconds per
epoch and the whole epoch (with its validation), each as a ratio to plain training within the same round
(median over rounds). The compare_distill grid's time column comes from separate experiments and runs beside
whatever else the machine does; this is the number to quote against the 1.3x target.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from yolo_compress import files
from yolo_compress.config import DISTILL_LOSSES, load_params
from yolo_compress.data.prepared import training_view
from yolo_compress.errors import stage_entrypoint
from yolo_compress.measure.timing import rotated, round_ratios
from yolo_compress.models import load_model, model_size
from yolo_compress.train import distill
from yolo_compress.train.trainer import distill_setup
from yolo_compress.train.training import train_model

log = logging.getLogger("yolo_compress.experiments.distill_overhead")
PLAIN = "plain"


class _TrainLoopClock:
    """Seconds of each epoch's training loop (first batch to last), validation excluded."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def start(self, trainer: Any) -> None:
        self._start = time.perf_counter()

    def end(self, trainer: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def ratios(times: Mapping[str, Sequence[float]], base: str = PLAIN) -> dict[str, float]:
    """Median over rounds of each method's seconds divided by `base`'s seconds of the same round."""
    return {m: statistics.median(r) for m, r in round_ratios(times, base).items()}


def format_table(loop: dict[str, list[float]], epoch: dict[str, list[float]], gflops_ratio: float,
                 setting: str) -> str:
    loop_r, epoch_r = ratios(loop), ratios(epoch)
    lines = [
        "# Distillation time overhead, measured side by side",
        "",
        f"{setting}. Teacher/student GFLOPs ratio {gflops_ratio:.2f}. Ratios are to plain training in the same "
        "round, median over rounds; seconds are per epoch, one value per round.",
        "",
        "| method | train loop s/epoch | ratio | whole epoch s (with val) | ratio |",
        "|---|---|---|---|---|",
    ]
    for m in loop:
        lines.append(f"| {m} | {' / '.join(f'{s:.1f}' for s in loop[m])} | {loop_r[m]:.2f}x "
                     f"| {' / '.join(f'{s:.1f}' for s in epoch[m])} | {epoch_r[m]:.2f}x |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--teacher", type=Path, help="teacher .pt; default: params.yaml's distill.teacher")
    ap.add_argument("--losses", nargs="+", choices=DISTILL_LOSSES, default=list(DISTILL_LOSSES))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per method and round")
    ap.add_argument("--out", type=Path, default=Path("reports/distill_overhead.md"))
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.epochs < 1:
        ap.error("--rounds and --epochs must be >= 1")
    return args


@stage_entrypoint
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    # Mosaic stays on, as in most epochs of the real schedule (it is closed only for the last close_mosaic).
    cfg = dataclasses.replace(params.student, epochs=args.epochs, close_mosaic=0)
    dcfg = params.distill
    teacher = args.teacher or Path(dcfg.teacher)
    distill.checked_inputs(cfg, args.data, teacher)

    methods = [PLAIN, *args.losses]
    loop: dict[str, list[float]] = {m: [] for m in methods}
    epoch: dict[str, list[float]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="distill_overhead_") as tmp:
        data_yaml = training_view(args.data, Path(tmp) / "data")
        for r in range(args.rounds):
            for m in rotated(methods, r):
                log.info("round %d/%d: %s, %d epoch(s)", r + 1, args.rounds, m, args.epochs)
                setup = {} if m == PLAIN else distill_setup(dataclasses.replace(dcfg, loss=m), teacher)
                model, clock = load_model(cfg.model, "student.model"), _TrainLoopClock()
                model.add_callback("on_train_epoch_start", clock.start)
                model.add_callback("on_train_epoch_end", clock.end)
                result = train_model(cfg, model, data_yaml, Path(tmp) / m, params.student_seed, **setup)
                loop[m].append(statistics.fmean(clock.seconds))
                epoch[m].append(result.seconds_per_epoch)
                if m == PLAIN:  # the student as trained (dataset classes), for its GFLOPs
                    student_gflops = model_size(result.best, cfg.imgsz)["gflops"]
    gflops_ratio = model_size(teacher, cfg.imgsz)["gflops"] / student_gflops
    setting = (f"{args.rounds} round(s) x {args.epochs} epoch(s), student {cfg.model} at {cfg.imgsz} px, batch "
               f"{cfg.batch}, mosaic {cfg.mosaic}, data {args.data}, teacher {teacher}")
    table = format_table(loop, epoch, gflops_ratio, setting)
    files.write_text(args.out, table)
    print(table)
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
