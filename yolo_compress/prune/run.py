"""The prune stage's work: measure the input, run the prune + fine-tune rounds with their early stop, keep a round.

Every row (the input's as round 0, then one per round) is measured alike: parameters, GFLOPs (Ultralytics' count)
and pycocotools mAP50-95 on the val split before and after the round's fine-tune. The stage script adds the files
and the MLflow runs around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yolo_compress.config import PruneConfig
from yolo_compress.errors import ModelError
from yolo_compress.measure.benchmark import gflops_ultralytics
from yolo_compress.models import YOLO, count_params
from yolo_compress.prune import rounds

__all__ = ["CALIB_BATCHES", "RoundsSetup", "kept_round", "prune_metrics", "prune_rounds"]

LOG = logging.getLogger(__name__)
# Unaugmented train batches for BatchNorm recalibration after each pruning step (and taylor importance's gradients):
# 8 gave the same round-1 mAP as 32 (0.055 vs 0.056), in 2.5 s against 8 s.
CALIB_BATCHES = 8


@dataclass(frozen=True)
class RoundsSetup:
    """What every round shares."""

    cfg: PruneConfig  # the prune: section
    work: Path  # scratch folder of the fine-tunes
    data_yaml: Path  # training view of the prepared data
    task: str  # detect | pose
    score: Callable[[Path], float]  # val mAP50-95 of a checkpoint
    finetune_args: dict[str, Any]  # imgsz, batch, lr0, seed, ... for rounds.finetune


def _row(k: int, pt: Path, before: float | None, t0: float, setup: RoundsSetup) -> dict[str, float]:
    imgsz = setup.finetune_args["imgsz"]
    gflops, after = gflops_ultralytics(pt, imgsz), setup.score(pt)
    if gflops <= 0:
        raise ModelError(f"{pt}: could not count its GFLOPs (thop failed on this model)")
    return {"round": k, "params_m": count_params(YOLO(str(pt))) / 1e6, "gflops": gflops,
            "map50_95_before": after if before is None else before, "map50_95_after": after,
            "seconds": time.perf_counter() - t0}


def prune_rounds(input_pt: Path, rounds_dir: Path, setup: RoundsSetup) -> Iterator[tuple[dict[str, float],
                                                                                         dict[str, float]]]:
    """Yield (row, round params) for the input (round 0, no params), then for each round as it ends; round k's
    checkpoint is `rounds_dir/round_<k>.pt`. Stops after a round whose val mAP50-95 falls more than
    `prune.max_map_drop` below the input's."""
    cfg, ft = setup.cfg, setup.finetune_args
    first = _row(0, input_pt, None, time.perf_counter(), setup)
    yield first, {}
    current = input_pt
    if cfg.importance == "bn" and cfg.sparsity_epochs > 0 and cfg.sparsity_l1 > 0:
        LOG.info("prune: %d epoch(s) of BN-gamma L1 sparsity training first", cfg.sparsity_epochs)
        current = rounds.finetune(input_pt, epochs=cfg.sparsity_epochs, work_dir=setup.work / "sparsity",
                                  data_yaml=setup.data_yaml, bn_l1=cfg.sparsity_l1, **ft)
    calib = rounds.calibration_batches(setup.data_yaml, ft["imgsz"], ft["batch"], CALIB_BATCHES, setup.task)
    for k, ratio in enumerate(rounds.prune_schedule(cfg.target, cfg.rounds, cfg.schedule), 1):
        t0, dst = time.perf_counter(), rounds_dir / f"round_{k}.pt"
        info = rounds.prune_finetune_round(
            current, dst, ratio, setup.work / f"round_{k}", setup.score, importance=cfg.importance,
            round_to=cfg.round_to, measure=cfg.measure, head=cfg.head, activation=cfg.activation,
            data_yaml=setup.data_yaml, epochs=cfg.round_epochs(k), calib=calib, meta={"round": k}, **ft)
        row = _row(k, dst, info["map50_95_before"], t0, setup)
        LOG.info("prune round %(round)d: %(gflops).4f GFLOPs, %(params_m).3fM params, val mAP50-95 "
                 "%(map50_95_before).4f before, %(map50_95_after).4f after fine-tune", row)
        yield row, {"round": k, "ratio": ratio, "channel_ratio": info["channel_ratio"]}
        current = dst
        if first["map50_95_after"] - row["map50_95_after"] > cfg.max_map_drop:
            break


def kept_round(rows: list[dict[str, float]], cfg: PruneConfig) -> tuple[int, str | None]:
    """The round to keep (`rounds.pick_round`) and, when it is not the last round run, the warning that says so."""
    base, done = rows[0]["map50_95_after"], len(rows) - 1
    keep = rounds.pick_round([r["map50_95_after"] for r in rows[1:]], base, cfg.max_map_drop)
    if keep == done:
        return keep, None
    return keep, (f"PRUNING STOPPED after round {done} of {cfg.rounds}: val mAP50-95 "
                  f"{rows[-1]['map50_95_after']:.4f} is more than prune.max_map_drop={cfg.max_map_drop} below the "
                  f"input's {base:.4f}. Keeping round {keep}"
                  f"{'' if keep < done else ', though it is outside the bound too (no round is inside)'}.")


def prune_metrics(rows: list[dict[str, float]], keep: int) -> dict[str, dict[str, float]]:
    """metrics/prune.json's numbers: the input, the kept round, what was removed and what it cost."""
    first, kept = rows[0], rows[keep]
    return {
        "input": {"params_m": first["params_m"], "gflops": first["gflops"], "map50_95": first["map50_95_after"]},
        "pruned": {"params_m": kept["params_m"], "gflops": kept["gflops"], "map50_95": kept["map50_95_after"],
                   "rounds_done": len(rows) - 1, "best_round": keep},
        "ratio": {"gflops_removed": 1 - kept["gflops"] / first["gflops"],
                  "params_removed": 1 - kept["params_m"] / first["params_m"]},
        "change": {"map50_95": kept["map50_95_after"] - first["map50_95_after"]},
        "time": {"seconds_total": sum(r["seconds"] for r in rows)},
    }
