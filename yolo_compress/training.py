"""Train one YOLO model with the stock Ultralytics trainer and collect a per-epoch curve."""

from __future__ import annotations

import os
import re
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from yolo_compress.config import TrainConfig
from yolo_compress.models import YOLO

EpochHook = Callable[[dict[str, float]], None]


def use_all_cores(trainer: Any) -> None:
    # Ultralytics' select_device caps CPU training at cpu_count - 1 threads: 1 of 2 cores, measured 1.7x slower.
    if trainer.device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def metric_key(name: str) -> str:
    """Ultralytics metric name -> our key: 'metrics/mAP50-95(B)' -> 'map50_95', '(P)' -> 'pose_' prefix."""
    pose = name.endswith("(P)")
    name = re.sub(r"\((B|P)\)$", "", name.removeprefix("metrics/"))
    name = name.replace("mAP", "map").replace("-", "_").replace("/", "_").lower()
    return f"pose_{name}" if pose else name


@dataclass
class TrainResult:
    """What one training run produced."""

    best: Path  # best.pt written by the trainer (EMA weights, fp16, optimizer stripped)
    val: dict[str, float]  # best.pt scored on val by the trainer's final validation
    curve: list[dict[str, float]] = field(default_factory=list)  # one row per epoch

    @property
    def seconds_per_epoch(self) -> float:
        return statistics.fmean(r["seconds"] for r in self.curve) if self.curve else 0.0


class _CurveRecorder:
    """Trainer callbacks: one curve row per epoch; the trainer's final best.pt validation is kept apart.

    The final validation fires on_fit_epoch_end too, but without on_train_epoch_start before it.
    """

    def __init__(self, on_epoch: EpochHook | None) -> None:
        self.rows: list[dict[str, float]] = []
        self.in_epoch = False
        self.on_epoch = on_epoch

    def epoch_start(self, trainer: Any) -> None:
        self.in_epoch = True

    def fit_epoch_end(self, trainer: Any) -> None:
        if not self.in_epoch:
            return
        self.in_epoch = False
        row: dict[str, float] = {"epoch": trainer.epoch + 1}
        losses = trainer.label_loss_items(trainer.tloss, prefix="train")
        row.update({metric_key(k): float(v) for k, v in losses.items()})
        row.update({metric_key(k): float(v) for k, v in trainer.metrics.items() if k != "fitness"})
        row["lr"] = float(trainer.lr.get("lr/pg0", 0.0))
        row["seconds"] = float(trainer.epoch_time or 0.0)
        self.rows.append(row)
        if self.on_epoch:
            self.on_epoch(row)


def train_model(
    cfg: TrainConfig,
    model: YOLO,
    data_yaml: Path,
    work_dir: Path,
    seed: int,
    on_epoch: EpochHook | None = None,
    trainer: Callable[..., Any] | None = None,
    extra_args: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` on `data_yaml`, saving under `work_dir` (emptied first).

    `trainer` replaces the stock trainer class (e.g. `distill.make_trainer(...)`); `extra_args` are more trainer
    arguments (e.g. Ultralytics' native `distill_model`/`dis`).
    """
    shutil.rmtree(work_dir, ignore_errors=True)
    recorder = _CurveRecorder(on_epoch)
    model.add_callback("on_pretrain_routine_start", use_all_cores)
    model.add_callback("on_train_epoch_start", recorder.epoch_start)
    model.add_callback("on_fit_epoch_end", recorder.fit_epoch_end)
    model.train(
        data=str(data_yaml),
        epochs=cfg.epochs,
        imgsz=cfg.imgsz,
        batch=cfg.batch,
        lr0=cfg.lr0,
        optimizer=cfg.optimizer,
        warmup_epochs=cfg.warmup_epochs,
        mosaic=cfg.mosaic,
        close_mosaic=cfg.close_mosaic,
        workers=cfg.workers,
        device=cfg.device,
        seed=seed,
        deterministic=True,
        project=str(work_dir.parent.resolve()),
        name=work_dir.name,
        exist_ok=True,
        plots=True,
        verbose=False,
        trainer=trainer,
        **(extra_args or {}),
    )
    done = model.trainer
    val = {metric_key(k): float(v) for k, v in done.metrics.items() if k.startswith("metrics/")}
    return TrainResult(best=Path(done.best), val=val, curve=recorder.rows)
