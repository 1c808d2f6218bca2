"""Train one YOLO model with the project's trainer (yolo_compress.train.trainer) and collect a per-epoch curve."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_compress import devices, files
from yolo_compress.config import TrainConfig
from yolo_compress.errors import raise_if_interrupted, set_resume_hint
from yolo_compress.models import YOLO, count_params, read_checkpoint
from yolo_compress.train.trainer import TrainerSpec, trainer_for

log = logging.getLogger(__name__)

EpochHook = Callable[[dict[str, float]], None]
# beside weights/ in the trainer's work folder; RESULT is written once training has finished
RUN_KEY, CURVE, RESULT = "run_key.txt", "curve.json", "result.json"


# A training run keeps last.pt and best.pt with the optimizer state (about 10 bytes per parameter each: 26 MB each for
# yolo11n's 2.6M, measured in the distill stage) and the stage copies the stripped fp16 one (2 bytes per parameter):
# 40 bytes per parameter leaves about twice what that needs.
CHECKPOINT_BYTES_PER_PARAM = 40


def checkpoint_room(model: YOLO) -> int:
    """Bytes of disk a training run of `model` needs for its checkpoints."""
    return CHECKPOINT_BYTES_PER_PARAM * count_params(model)


def use_all_cores_on_cpu(trainer: Any) -> None:
    """Trainer callback: Ultralytics' select_device caps CPU training at cpu_count - 1 threads (1 of 2 cores,
    measured 1.7x slower)."""
    if trainer.device.type == "cpu":
        devices.use_all_cores()


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
    resumed_after: int = 0  # epochs done by the interrupted run this one continued (0: trained in one go)

    @property
    def seconds_per_epoch(self) -> float:
        return statistics.fmean(r["seconds"] for r in self.curve) if self.curve else 0.0


class _CurveRecorder:
    """Trainer callbacks: one curve row per epoch; the trainer's final best.pt validation is kept apart.

    The final validation fires on_fit_epoch_end too, but without on_train_epoch_start before it.
    """

    def __init__(self, on_epoch: EpochHook | None, save_to: Path, rows: Sequence[dict[str, float]] = ()) -> None:
        self.rows: list[dict[str, float]] = list(rows)
        self.in_epoch = False
        self.on_epoch = on_epoch
        self.save_to = save_to  # kept with last.pt, so a resumed run gets the curve of the epochs before it

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
        files.write_json(self.save_to, self.rows)
        if self.on_epoch:
            self.on_epoch(row)


def run_key(train_args: dict[str, Any], inputs: Sequence[str | Path]) -> str:
    """Identity of a training run: its trainer arguments plus the size and mtime of every input file.

    An interrupted run is resumed only under the same key; anything else changed means a clean restart.
    """
    digest = hashlib.sha256(json.dumps(train_args, sort_keys=True, default=repr).encode())
    for root in map(Path, inputs):
        for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if f.is_file():
                st = f.stat()
                digest.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def resumable_epoch(work_dir: Path, key: str, epochs: int) -> int | None:
    """Epochs done by an interrupted run in `work_dir` that can be continued under `key`, else None.

    A finished run (optimizer stripped), a checkpoint torn by SIGKILL or a run with other inputs is not resumable.
    """
    last, saved_key = work_dir / "weights" / "last.pt", work_dir / RUN_KEY
    if not (last.is_file() and saved_key.is_file()) or saved_key.read_text().strip() != key:
        return None
    try:
        ckpt = read_checkpoint(last, str(last))
    except Exception as err:  # noqa: BLE001 - a torn or foreign file of any kind just means: start over
        log.warning("%s is unreadable (%s): restarting from scratch", last, type(err).__name__)
        return None
    done = ckpt.get("epoch", -1) + 1 if isinstance(ckpt, dict) and ckpt.get("optimizer") is not None else 0
    if not 0 < done < epochs:
        return None
    # Ultralytics saves last.pt before the epoch-end callback that saves the curve: an interruption in
    # between leaves a checkpoint whose last epoch has no curve row, and a resumed curve would lack it.
    curve = files.read_json(work_dir / CURVE) if (work_dir / CURVE).is_file() else []
    if {r["epoch"] for r in curve} < set(range(1, done + 1)):
        log.warning("%s lacks the curve of epoch %d (interrupted while saving it): restarting from scratch",
                    work_dir / CURVE, done)
        return None
    return done


def _next_epoch(done: int | None) -> int | None:
    return done + 1 if done else None


def train_model(
    cfg: TrainConfig,
    model: YOLO,
    data_yaml: Path,
    work_dir: Path,
    seed: int,
    on_epoch: EpochHook | None = None,
    spec: TrainerSpec | None = None,
    resume: bool = False,
    inputs: Sequence[str | Path] = (),
) -> TrainResult:
    """Train `model` on `data_yaml`, saving under `work_dir`.

    The trainer is the task's `CompressTrainer` with `spec` (e.g. a teacher loss, from `trainer.distill_setup`).
    With `resume`, a run in `work_dir` with the same arguments and `inputs` (files or folders) is reused when it
    finished (a stage that failed to write its outputs) and continued from its last.pt when it was interrupted;
    otherwise `work_dir` is emptied and training starts from scratch.
    """
    args = dict(
        data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, nbs=cfg.nominal_batch, lr0=cfg.lr0,
        optimizer=cfg.optimizer, warmup_epochs=cfg.warmup_epochs, mosaic=cfg.mosaic, close_mosaic=cfg.close_mosaic,
        workers=cfg.workers, device=cfg.device, amp=cfg.amp, seed=seed, deterministic=True,
        project=str(work_dir.parent.resolve()), name=work_dir.name, exist_ok=True, plots=True, verbose=False,
    )
    key = run_key({**args, "spec": repr(spec), "model": model.model.yaml}, inputs)
    finished = finished_run(work_dir, key) if resume else None
    if finished is not None:
        log.info("%s holds a finished run with the same arguments and inputs: its weights are used, not trained again",
                 work_dir)
        for row in finished.curve:
            if on_epoch:
                on_epoch(row)
        return finished
    done = resumable_epoch(work_dir, key, cfg.epochs)
    resumed_after = done if resume and done is not None else 0
    if resumed_after:
        log.info("resuming the interrupted run in %s after epoch %d of %d", work_dir, done, cfg.epochs)
        rows = [r for r in files.read_json(work_dir / CURVE) if r["epoch"] <= done]
        model, args = YOLO(work_dir / "weights" / "last.pt"), {"resume": True, "device": cfg.device}
    else:
        if done is not None:
            log.warning("%s holds a run interrupted after epoch %d; restarting from scratch for a reproducible "
                        "result (set `resume: true` in params.yaml to continue it instead)", work_dir, done)
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        (work_dir / RUN_KEY).write_text(key + "\n")
        rows = []
    recorder = _CurveRecorder(on_epoch, work_dir / CURVE, rows)
    for row in rows:  # this run's tracking gets the whole curve, not just the epochs after the restart
        if on_epoch:
            on_epoch(row)
    # An interrupted stage tells the user whether a rerun with `resume: true` can continue this run (errors.py).
    set_resume_hint(lambda: _next_epoch(resumable_epoch(work_dir, key, cfg.epochs)))
    model.add_callback("on_pretrain_routine_start", use_all_cores_on_cpu)
    model.add_callback("on_train_epoch_start", recorder.epoch_start)
    model.add_callback("on_fit_epoch_end", recorder.fit_epoch_end)
    model.add_callback("on_train_batch_end", lambda _: raise_if_interrupted())  # a swallowed signal stops it here
    model.train(trainer=trainer_for(model.task, spec), **args)
    set_resume_hint(None)  # not in a finally: an interruption must keep the hint for the stage's one line
    trained = model.trainer
    val = {metric_key(k): float(v) for k, v in trained.metrics.items() if k.startswith("metrics/")}
    result = TrainResult(best=Path(trained.best), val=val, curve=recorder.rows, resumed_after=resumed_after)
    # so that a stage that fails to write its outputs can be rerun with `resume: true` without training again
    files.write_json(work_dir / RESULT, {"key": key, "best": str(result.best), "val": val,
                                         "resumed_after": resumed_after})
    return result


def finished_run(work_dir: Path, key: str) -> TrainResult | None:
    """The result of a run in `work_dir` that finished under `key` and whose best.pt is still there, else None."""
    path = work_dir / RESULT
    if not path.is_file():
        return None
    saved = files.read_json(path)
    if saved.get("key") != key or not Path(saved["best"]).is_file() or not (work_dir / CURVE).is_file():
        return None
    return TrainResult(best=Path(saved["best"]), val=saved["val"], curve=files.read_json(work_dir / CURVE),
                       resumed_after=saved["resumed_after"])
