"""The prune stage's work: measure the input, run the prune + fine-tune rounds with their early stop, keep a round.

Every row (the input's as round 0, then one per round) is measured alike: parameters, GFLOPs (Ultralytics' count)
and pycocotools mAP50-95 on the val split before and after the round's fine-tune. The stage script adds the files
and the MLflow runs around it.

Decisions use the noise of that score, not its point value. Each round's drop from the input (input mAP minus the
round's, after fine-tune) gets a paired bootstrap interval over the val images (`measure.bootstrap`: the same
resamples for both models). A round is **over the bound** only when the interval's low end is above
`prune.max_map_drop`: the drop is larger than the bound with 97.5% confidence. Pruning stops after such a round, and
the kept round is the deepest one not over the bound. On the default data a 1.7-point drop on 100 val images was
within that noise, and a point rule flipped this decision between CPUs and thread counts (docs/pruning.md).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yolo_compress.config import DistillConfig, Params, PruneConfig
from yolo_compress.data.prepared import training_view
from yolo_compress.errors import ModelError
from yolo_compress.measure.benchmark import gflops_ultralytics
from yolo_compress.measure.bootstrap import interval_keys, map_samples, paired_keys
from yolo_compress.measure.evaluation import evaluate_split_with_predictions, gt_json_for
from yolo_compress.models import YOLO, count_params
from yolo_compress.prune import rounds
from yolo_compress.train.training import use_all_cores_on_cpu

__all__ = ["CALIB_BATCHES", "RoundsSetup", "control_finetune", "control_metrics", "kept_round", "over_bound",
           "prune_metrics", "prune_rounds", "rounds_setup", "val_score"]

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
    score: Callable[[Path], tuple[float, np.ndarray]]  # val mAP50-95 of a checkpoint, and its bootstrap samples
    finetune_args: dict[str, Any]  # imgsz, batch, lr0, seed, ... for rounds.finetune


def val_score(pt: Path, split_yaml: Path, imgsz: int, device: str | int, batch: int) -> tuple[float, np.ndarray]:
    """The one mAP of the prune stage: pycocotools mAP50-95 on the prepared val split, and its bootstrap samples."""
    scores, dets = evaluate_split_with_predictions(pt, split_yaml, imgsz, device=device, batch=batch)
    return scores["map50_95"], map_samples(gt_json_for(split_yaml), dets, "val")


def rounds_setup(params: Params, data: Path, work: Path, task: str, distill: DistillConfig | None) -> RoundsSetup:
    """The rounds' setup from params.yaml (prune:, and the student: budget the fine-tunes reuse)."""
    cfg, st = params.prune, params.student
    val_yaml = training_view(data, work / "val", split="val")
    return RoundsSetup(
        cfg=cfg, work=work, data_yaml=training_view(data, work / "data"), task=task,
        score=functools.partial(val_score, split_yaml=val_yaml, imgsz=st.imgsz, device=st.device, batch=st.batch),
        # Warm-up off: it starts the bias lr at 0.1, which wrecks trained weights in a short fine-tune.
        # val off: each fine-tune keeps its last epoch (the rounds' scores are the stage's own, after it), the same
        # rule for the rounds and the control; Ultralytics' val after each epoch cost ~6 s of a ~19 s epoch.
        finetune_args=dict(imgsz=st.imgsz, batch=st.batch, nbs=st.nominal_batch, lr0=cfg.lr0,
                           seed=params.student_seed, optimizer=st.optimizer, workers=st.workers, device=st.device,
                           warmup_epochs=0.0, plots=False, val=False, distill=distill,
                           callbacks={"on_pretrain_routine_start": use_all_cores_on_cpu}))


def _row(k: int, pt: Path, before: float | None, t0: float, setup: RoundsSetup,
         base: tuple[float, np.ndarray] | None) -> tuple[dict[str, float], tuple[float, np.ndarray]]:
    """A round's row (`base`: the input's score and samples; None for the input itself), and its score and samples."""
    imgsz = setup.finetune_args["imgsz"]
    gflops, (after, samples) = gflops_ultralytics(pt, imgsz), setup.score(pt)
    if gflops <= 0:
        raise ModelError(f"{pt}: could not count its GFLOPs (thop failed on this model)")
    drop = (0.0, np.zeros_like(samples)) if base is None else (base[0] - after, base[1] - samples)
    row = {"round": k, "params_m": count_params(YOLO(str(pt))) / 1e6, "gflops": gflops,
           "map50_95_before": after if before is None else before, "map50_95_after": after,
           "drop": drop[0], **interval_keys("drop", drop[1]), "seconds": time.perf_counter() - t0}
    return row, (after, samples)


def over_bound(row: dict[str, float], max_drop: float) -> bool:
    """Whether a round's drop from the input is above `max_drop` with confidence (its interval's low end is)."""
    return row["drop_ci95_low"] > max_drop


def prune_rounds(input_pt: Path, rounds_dir: Path, setup: RoundsSetup) -> Iterator[tuple[dict[str, float],
                                                                                         dict[str, float]]]:
    """Yield (row, round params) for the input (round 0, no params), then for each round as it ends; round k's
    checkpoint is `rounds_dir/round_<k>.pt`. Stops after a round that is over the bound (`over_bound`)."""
    cfg, ft = setup.cfg, setup.finetune_args
    first, base = _row(0, input_pt, None, time.perf_counter(), setup, None)
    yield first, {}
    current = input_pt
    if cfg.sparsity_training:
        LOG.info("prune: %d epoch(s) of BN-gamma L1 sparsity training first", cfg.sparsity_epochs)
        current = rounds.finetune(input_pt, epochs=cfg.sparsity_epochs, work_dir=setup.work / "sparsity",
                                  data_yaml=setup.data_yaml, bn_l1=cfg.sparsity_l1, **ft)
    calib = rounds.calibration_batches(setup.data_yaml, ft["imgsz"], ft["batch"], CALIB_BATCHES, setup.task)
    for k, ratio in enumerate(rounds.prune_schedule(cfg.target, cfg.rounds, cfg.schedule), 1):
        t0, dst = time.perf_counter(), rounds_dir / f"round_{k}.pt"
        info = rounds.prune_finetune_round(
            current, dst, ratio, setup.work / f"round_{k}", lambda pt: setup.score(pt)[0], importance=cfg.importance,
            round_to=cfg.round_to, measure=cfg.measure, head=cfg.head, activation=cfg.activation,
            data_yaml=setup.data_yaml, epochs=cfg.round_epochs(k), calib=calib, meta={"round": k}, **ft)
        row, _ = _row(k, dst, info["map50_95_before"], t0, setup, base)
        LOG.info("prune round %(round)d: %(gflops).4f GFLOPs, %(params_m).3fM params, val mAP50-95 "
                 "%(map50_95_before).4f before, %(map50_95_after).4f after fine-tune; drop from the input %(drop).4f "
                 "[%(drop_ci95_low).4f, %(drop_ci95_high).4f]", row)
        yield row, {"round": k, "ratio": ratio, "channel_ratio": info["channel_ratio"]}
        current = dst
        if over_bound(row, cfg.max_map_drop):
            break


def control_finetune(input_pt: Path, keep: int, setup: RoundsSetup) -> Path:
    """The kept round's epoch-matched control: the input fine-tuned with the rounds' own fine-tunes (sparsity epochs
    as plain epochs, then rounds 1..keep's epochs; same lr, data, seed and distill: loss), never pruned and with its
    own activation. Returns its checkpoint; what it scores beside the pruned model is what pruning cost."""
    cfg = setup.cfg
    epochs = [cfg.sparsity_epochs] if cfg.sparsity_training else []
    epochs = [e for e in epochs + [cfg.round_epochs(k) for k in range(1, keep + 1)] if e]
    current = input_pt
    for i, n in enumerate(epochs):
        LOG.info("prune control: fine-tune %d of %d, %d epoch(s), unpruned", i + 1, len(epochs), n)
        current = rounds.finetune(current, setup.data_yaml, n, work_dir=setup.work / f"control_{i + 1}",
                                  **setup.finetune_args)
    return current


def control_metrics(control_pt: Path, pruned_pt: Path, epochs: int, setup: RoundsSetup) -> dict[str, float]:
    """metrics/prune.json's `control`: its val mAP50-95, its extra epochs, and the pruned model's score minus the
    control's (`pruned_minus_control`) with its paired interval: what pruning cost once the extra training is equal."""
    (control, c_samples), (pruned, p_samples) = setup.score(control_pt), setup.score(pruned_pt)
    return {"map50_95": control, "finetune_epochs": epochs,
            **paired_keys("pruned_minus_control", pruned - control, p_samples, c_samples)}


def kept_round(rows: list[dict[str, float]], cfg: PruneConfig) -> tuple[int, list[str]]:
    """The round to keep (`rounds.pick_round`), and one warning for each thing a reader must know: pruning stopped
    before prune.rounds, the kept round is over the bound, or its point drop is over it (within the noise)."""
    done, bound = len(rows) - 1, cfg.max_map_drop
    keep = rounds.pick_round([over_bound(r, bound) for r in rows[1:]])
    kept, warnings = rows[keep], []
    if done < cfg.rounds:
        last = rows[-1]
        warnings.append(f"PRUNING STOPPED after round {done} of {cfg.rounds}: its val mAP50-95 drop from the input, "
                        f"{last['drop']:.4f} [{last['drop_ci95_low']:.4f}, {last['drop_ci95_high']:.4f}], is over "
                        f"prune.max_map_drop={bound} with confidence")
    if over_bound(kept, bound):
        warnings.append(f"KEPT ROUND {keep} IS OVER THE BOUND: no round is within prune.max_map_drop={bound} "
                        f"(round {keep} drops {kept['drop']:.4f} [{kept['drop_ci95_low']:.4f}, "
                        f"{kept['drop_ci95_high']:.4f}]); round 1 is kept as the least pruned model")
    elif kept["drop"] > bound:
        warnings.append(f"kept round {keep} drops {kept['drop']:.4f} from the input, over prune.max_map_drop={bound}, "
                        f"but within the noise of the val images' score ([{kept['drop_ci95_low']:.4f}, "
                        f"{kept['drop_ci95_high']:.4f}])")
    return keep, warnings


def prune_metrics(rows: list[dict[str, float]], keep: int, cfg: PruneConfig,
                  input_epochs: int | None = None) -> dict[str, dict[str, float]]:
    """metrics/prune.json's numbers: the input, the kept round, what was removed and what it cost.

    `pruned.finetune_epochs` is the extra training the kept model got (an epoch-matched control would train the
    input that long); `input.train_epochs` the epochs of the input's own training run, where its checkpoint says."""
    first, kept = rows[0], rows[keep]
    return {
        "input": {"params_m": first["params_m"], "gflops": first["gflops"], "map50_95": first["map50_95_after"],
                  **({"train_epochs": input_epochs} if input_epochs is not None else {})},
        "pruned": {"params_m": kept["params_m"], "gflops": kept["gflops"], "map50_95": kept["map50_95_after"],
                   "rounds_done": len(rows) - 1, "best_round": keep, "stopped_early": int(len(rows) - 1 < cfg.rounds),
                   "drop": kept["drop"], "drop_ci95_low": kept["drop_ci95_low"],
                   "drop_ci95_high": kept["drop_ci95_high"], "over_bound": int(over_bound(kept, cfg.max_map_drop)),
                   "point_over_bound": int(kept["drop"] > cfg.max_map_drop),
                   "finetune_epochs": cfg.epochs_through(keep)},
        "ratio": {"gflops_removed": 1 - kept["gflops"] / first["gflops"],
                  "params_removed": 1 - kept["params_m"] / first["params_m"]},
        "change": {"map50_95": kept["map50_95_after"] - first["map50_95_after"]},
        "time": {"seconds_total": sum(r["seconds"] for r in rows)},
    }
