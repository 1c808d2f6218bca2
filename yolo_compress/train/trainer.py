"""The one place that meets Ultralytics' trainer: `CompressTrainer`, used by train, distill and the prune fine-tune.

It extends the stock task trainer through its public methods and callbacks only:
- `get_model` keeps a given (pruned) module as is, where the stock trainer would rebuild it from a stale model.yaml;
- a teacher loss goes in through the model's criterion (`distill.DistillCriterion`), installed when the stock setup
  ends (`on_pretrain_routine_end`), after anything the setup or a resume does to the criterion;
- checkpoints are Ultralytics' own `save_model`, of the plain student: the distillation adapters leave the EMA copy
  while it is saved and go to `adapters.pt` beside last.pt, from where a resume restores them;
- everything the trainer adds is a `TrainerSpec` of plain values. Ultralytics' DDP launcher rebuilds the trainer in
  each process from its class and arguments alone, so the spec travels to those processes in an environment
  variable, and the same trainer runs on one device or several.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.utils import DEFAULT_CFG
from ultralytics.utils.torch_utils import unwrap_model

from yolo_compress import files
from yolo_compress.config import DistillConfig
from yolo_compress.errors import ModelError
from yolo_compress.models import fixed_blocks, is_pruned_yaml, unwrap_yolo
from yolo_compress.train.distill import (
    ADAPTERS,
    DistillCriterion,
    UnlabeledImages,
    build_adapters,
    check_pair,
    load_teacher,
    loss_weight,
    prepare_teacher,
)

__all__ = ["SPEC_ENV", "TRAINERS", "CompressDetectionTrainer", "CompressPoseTrainer", "TrainerSpec", "add_bn_l1_grad",
           "distill_setup", "trainer_for"]

SPEC_ENV = "YOLO_COMPRESS_TRAINER_SPEC"  # the TrainerSpec as JSON, for the trainers Ultralytics' DDP launcher rebuilds
ADAPTERS_FILE = "adapters.pt"  # beside last.pt: the adapters' weights, for resume


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """What CompressTrainer adds to the stock trainer, as plain values (JSON for the DDP processes)."""

    keep_model: bool = False  # train the given module as is (a pruned model), never rebuilt from model.yaml
    distill: DistillConfig | None = None  # add this teacher loss; distill.teacher is a local .pt path
    bn_l1: float = 0.0  # network slimming: L1 on BatchNorm gammas at each optimizer step (add_bn_l1_grad)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainerSpec:
        raw = json.loads(text)
        distill = raw.pop("distill")
        return cls(**raw, distill=DistillConfig(**distill) if distill else None)


def _cycle(loader: Any) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


# Callbacks, not overrides: the stock setup and epoch loop are private methods with public events around them.
def _add_teacher_loss(trainer: Any) -> None:
    """on_pretrain_routine_end: wrap the student's criterion."""
    if trainer.teacher is None:
        return
    trainer.teacher.to(trainer.device)
    model = unwrap_model(trainer.model)
    base = getattr(model, "criterion", None) or model.init_criterion()
    model.criterion = DistillCriterion(base, trainer.teacher, getattr(model, ADAPTERS), trainer.spec.distill)
    if trainer.spec.distill.unlabeled:
        trainer.unlabeled = _cycle(trainer.unlabeled_loader(Path(trainer.spec.distill.unlabeled)))


def _on_epoch_start(trainer: Any) -> None:
    trainer.batch_in_epoch = 0


def _on_batch_start(trainer: Any) -> None:
    """Set this step's distillation weight from the global step (epoch * batches + batch)."""
    if trainer.teacher is None:
        return
    nb = len(trainer.train_loader)
    step = trainer.epoch * nb + trainer.batch_in_epoch
    trainer.batch_in_epoch += 1
    cfg = trainer.spec.distill
    trainer.dis_weight = loss_weight(step, trainer.epochs * nb, cfg.base_weight, cfg.schedule, cfg.off_last_epochs, nb)
    criterion = unwrap_model(trainer.model).criterion
    if isinstance(criterion, DistillCriterion):
        criterion.weight = trainer.dis_weight


CALLBACKS = (("on_pretrain_routine_end", _add_teacher_loss), ("on_train_epoch_start", _on_epoch_start),
             ("on_train_batch_start", _on_batch_start))


def check_kept_model(model: Any, data: dict[str, Any]) -> nn.Module:
    """The given module, if its head predicts the dataset's classes and keypoints (a pruned head cannot change)."""
    if not isinstance(model, nn.Module):
        raise ModelError("a pruned model cannot be rebuilt from its model.yaml; train it with pretrained=True "
                         "(the default) so the pruned weights are used")
    head, name = model.model[-1], data.get("yaml_file", "data")
    if getattr(head, "nc", data["nc"]) != data["nc"]:
        raise ModelError(f"{name}: dataset has {data['nc']} classes but the pruned model has {head.nc}; a pruned "
                         "head cannot change, fine-tune on the same dataset")
    kpt = getattr(head, "kpt_shape", None)
    if kpt is not None and "kpt_shape" in data and list(kpt) != list(data["kpt_shape"]):
        raise ModelError(f"{name}: dataset kpt_shape {data['kpt_shape']} differs from the pruned model's {list(kpt)}")
    return model


class CompressTrainer:
    """The stock task trainer plus a TrainerSpec; bound to each task's trainer below (`trainer_for`).

    Rebuilt from plain arguments in DDP processes: the spec comes from `SPEC_ENV` when none is passed.
    """

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None,
                 _callbacks: dict | None = None, spec: TrainerSpec | None = None) -> None:
        if spec is None:
            spec = TrainerSpec.from_json(os.environ[SPEC_ENV]) if os.environ.get(SPEC_ENV) else TrainerSpec()
        # own copy: Model.train shares its callbacks dict with the trainer, and ours must not leak into it
        _callbacks = {k: list(v) for k, v in _callbacks.items()} if _callbacks else None
        super().__init__(cfg, overrides, _callbacks)
        self.spec = spec
        d = spec.distill
        self.teacher = prepare_teacher(load_teacher(d.teacher), fuse=d.fuse_teacher) if d else None
        self.dis_weight, self.batch_in_epoch = (d.base_weight if d else 0.0), 0
        self.unlabeled: Iterator[dict[str, Any]] | None = None
        for event, fn in CALLBACKS:
            if fn not in self.callbacks[event]:  # a DDP process gets the parent's callbacks, ours included
                self.add_callback(event, fn)

    def ddp_environment(self) -> dict[str, str]:
        """The environment the DDP processes need to rebuild this trainer."""
        return {SPEC_ENV: self.spec.to_json()}

    def train(self) -> Any:
        if not self.ddp:
            return super().train()
        before = {k: os.environ.get(k) for k in self.ddp_environment()}
        os.environ.update(self.ddp_environment())
        try:
            return super().train()
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """The given module as is (`keep_model`) or the stock build; plus adapters sized from it and the teacher."""
        if self.spec.keep_model:
            model = check_kept_model(weights, self.data)
        elif is_pruned_yaml(cfg):
            raise ModelError("a pruned model's model.yaml has stale widths: fine-tune it with "
                             "yolo_compress.prune.rounds.finetune, which keeps the module as is")
        else:
            model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        if self.teacher is not None and not isinstance(getattr(model, ADAPTERS, None), nn.ModuleDict):
            channels = check_pair(self.teacher, model, int(self.args.imgsz))
            setattr(model, ADAPTERS, build_adapters(self.spec.distill.loss, channels))
        return model

    def unlabeled_loader(self, folder: Path) -> DataLoader:
        dataset = UnlabeledImages(folder, int(self.args.imgsz))
        workers = min(self.args.workers, 4)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=workers,
                          persistent_workers=workers > 0, drop_last=len(dataset) >= self.batch_size)

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Stock preprocessing; then, when distilling, append a batch of unlabeled images (labels untouched)."""
        batch = super().preprocess_batch(batch)
        if self.unlabeled is not None and self.dis_weight > 0:
            extra = next(self.unlabeled)
            img = extra["img"].to(self.device).float() / 255
            if img.shape[2:] != batch["img"].shape[2:]:  # multi-scale resized the labeled batch
                img = nn.functional.interpolate(img, size=batch["img"].shape[2:], mode="bilinear", align_corners=False)
            batch["n_labeled"] = batch["img"].shape[0]
            batch["img"] = torch.cat([batch["img"], img])
            batch["im_file"] = [*batch["im_file"], *extra["im_file"]]
        return batch

    def optimizer_step(self) -> None:
        if self.spec.bn_l1 > 0:
            # Gradients are still scaled by AMP here; scaling the penalty the same way makes it bn_l1 after unscale_.
            add_bn_l1_grad(self.model, self.spec.bn_l1 * self.scaler.get_scale())
        super().optimizer_step()

    def save_model(self) -> Any:
        """Ultralytics' own save of a plain student; the adapters go to adapters.pt for resume."""
        ema = self.ema.ema
        adapters = getattr(ema, ADAPTERS, None)
        if adapters is not None:
            delattr(ema, ADAPTERS)
        try:
            saved = super().save_model()
        finally:
            if adapters is not None:
                setattr(ema, ADAPTERS, adapters)
        live = getattr(unwrap_model(self.model), ADAPTERS, None)
        if live is not None and len(live):
            files.write_with(Path(self.wdir) / ADAPTERS_FILE, lambda tmp: torch.save(live.state_dict(), tmp))
        return saved

    def resume_training(self, ckpt: dict[str, Any] | None) -> None:
        """Ultralytics' resume, with the adapters from adapters.pt put back into the model and the saved EMA."""
        live = getattr(unwrap_model(self.model), ADAPTERS, None)
        if ckpt and self.resume and live is not None and len(live):
            path = Path(self.wdir) / ADAPTERS_FILE
            if not path.is_file():
                raise ModelError(f"{path}: not found, so this run's distillation adapters cannot be resumed; "
                                 "restart it (resume: false)")
            live.load_state_dict(torch.load(path, map_location=self.device))
            setattr(ckpt["ema"], ADAPTERS, deepcopy(live))  # the EMA's checkpoint is plain; its state must match
        super().resume_training(ckpt)

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        super().save_metrics({**metrics, "dis/weight": self.dis_weight} if self.teacher is not None else metrics)


class CompressDetectionTrainer(CompressTrainer, DetectionTrainer):
    """DetectionTrainer plus a TrainerSpec (kept model, teacher loss, BN sparsity)."""


class CompressPoseTrainer(CompressTrainer, PoseTrainer):
    """PoseTrainer plus a TrainerSpec (kept model, teacher loss, BN sparsity)."""


TRAINERS: dict[str, type] = {"detect": CompressDetectionTrainer, "pose": CompressPoseTrainer}


def add_bn_l1_grad(model: nn.Module, lam: float, skip: Iterable[nn.Module] | None = None) -> int:
    """Network slimming (the prune stage's `bn` importance): add `lam * sign(gamma)`, the L1 penalty's gradient, to
    every BN weight's grad, in place.

    Call after the loss backward and `scaler.unscale_`, before the optimizer step. BNs inside `skip` (default: the
    attention blocks and the head, which are never pruned) are left alone. Returns the number of BNs changed.
    """
    model = unwrap_yolo(model)
    skipped = {id(m) for s in (fixed_blocks(model) if skip is None else skip) for m in s.modules()}
    n = 0
    for m in model.modules():
        grad = m.weight.grad if isinstance(m, nn.BatchNorm2d) and m.weight is not None else None
        if grad is not None and id(m) not in skipped:
            grad.add_(torch.sign(m.weight.detach()), alpha=lam)
            n += 1
    return n


def trainer_for(task: str, spec: TrainerSpec | None = None) -> Callable[..., Any]:
    """Trainer factory for `YOLO.train(trainer=...)`: the task's CompressTrainer bound to `spec`."""
    if task not in TRAINERS:
        raise ModelError(f"this project trains tasks {', '.join(TRAINERS)}, not {task!r}")
    return functools.partial(TRAINERS[task], spec=spec or TrainerSpec())


def distill_setup(cfg: DistillConfig, teacher: str | Path) -> dict[str, Any]:
    """Keyword arguments for `training.train_model` that add `cfg`'s teacher loss (every loss, sl2 included, goes
    through the same criterion; docs/distillation.md, "One sl2")."""
    # absolute: the trainer stores the spec in last.pt and rebuilds the teacher from it on resume
    return {"spec": TrainerSpec(distill=dataclasses.replace(cfg, teacher=str(Path(teacher).resolve())))}
