"""Feature and output distillation from a frozen teacher into a YOLO student, inside the stock Ultralytics trainer.

Design (see NOTES "Custom losses on the trainer"):
- Adapters are a `distill_adapters` ModuleDict of stock torch layers registered on the STUDENT model, so the optimizer
  sees them, EMA copies them, last.pt saves them and resume restores them; checkpoints need no custom classes.
  `strip_distillation` removes them; the trainer strips best.pt/last.pt when training ends.
- The teacher is owned by the trainer, not the model: the trainer's freeze loop, optimizer, EMA and checkpoints
  never see it. It runs frozen, in eval(), BatchNorm-fused, under torch.inference_mode().
- No forward hooks are kept: the head's training output already carries its inputs ('feats'), so the loss reads
  student and teacher features from the outputs and nothing has to survive pickling or the EMA deepcopy.
- The loss is added by wrapping the student's own criterion, so `dis_loss` is one more loss item (a column in
  results.csv) and the trainer's loop stays untouched. Its weight follows a schedule by global step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from ultralytics.data.augment import LetterBox
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.nn.distill_model import DistillationModel
from ultralytics.nn.tasks import guess_model_task, load_checkpoint
from ultralytics.utils import DEFAULT_CFG, RANK
from ultralytics.utils.patches import imread
from ultralytics.utils.torch_utils import unwrap_model

from yolo_compress.config import DISTILL_LOSSES, DISTILL_SCHEDULES, DistillConfig, TrainConfig
from yolo_compress.dataset import load_summary
from yolo_compress.distill_losses import (
    LOSSES,
    clone_tree,
    cwd_loss,
    head_branches,
    logit_kd_loss,
    mgd_loss,
    sl2_loss,
    take_images,
)
from yolo_compress.errors import DatasetError, ModelError, ParamsError
from yolo_compress.models import (
    YOLO,
    ModelInfo,
    check_same_head,
    check_task,
    count_params,
    dataset_head,
    load_model,
    model_info,
    read_checkpoint,
)

__all__ = [
    "METHODS",
    "LOSSES",
    "DistillConfig",
    "DistillCriterion",
    "DistillDetectionTrainer",
    "DistillPoseTrainer",
    "build_adapters",
    "check_native",
    "check_pair",
    "checked_inputs",
    "check_teacher",
    "cwd_loss",
    "distill_layers",
    "feature_channels",
    "load_teacher",
    "logit_kd_loss",
    "loss_weight",
    "make_trainer",
    "mgd_loss",
    "plain_student_checkpoint",
    "prepare_teacher",
    "sl2_loss",
    "strip_checkpoint",
    "strip_distillation",
    "training_setup",
    "unlabeled_images",
]

ADAPTERS = "distill_adapters"  # attribute name of the adapters ModuleDict on the student model
METHODS = DISTILL_LOSSES
SCHEDULES = DISTILL_SCHEDULES


# ---------------------------------------------------------------------------------------------------------- schedule
def loss_weight(
    step: int,
    total_steps: int,
    weight: float,
    schedule: str = "constant",
    off_last_epochs: int = 0,
    steps_per_epoch: int = 0,
) -> float:
    """Distillation weight at global `step` (0-based batch count since the start of training, never per epoch)."""
    if schedule == "constant":
        return weight
    if schedule == "cosine":
        progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        return weight * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "off_last":
        return 0.0 if step >= total_steps - off_last_epochs * steps_per_epoch else weight
    raise ValueError(f"loss_weight: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


# --------------------------------------------------------------------------------------------------------- alignment
def _inner(model: Any) -> nn.Module:
    """The DetectionModel/PoseModel inside a YOLO wrapper, or the module itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "yaml") else model


def distill_layers(model: Any) -> list[int]:
    """Indices of the layers feeding the Detect/Pose head (`model.model[-1].f`): the distilled feature levels."""
    return list(_inner(model).model[-1].f)


def feature_channels(model: Any, imgsz: int) -> list[tuple[int, int]]:
    """(channels, stride) of each head input, read by a dry eval forward at `imgsz` with a temporary hook."""
    inner = _inner(model)
    shapes: list[torch.Size] = []
    handle = inner.model[-1].register_forward_pre_hook(lambda m, args: shapes.extend(x.shape for x in args[0]))
    was_training = inner.training
    try:
        inner.eval()
        ch = inner.yaml.get("channels", 3)
        with torch.no_grad():
            inner(torch.zeros(1, ch, imgsz, imgsz, device=next(inner.parameters()).device))
    finally:
        handle.remove()
        inner.train(was_training)
    return [(s[1], imgsz // s[-1]) for s in shapes]


def _head_info(model: nn.Module) -> ModelInfo:
    head = model.model[-1]
    kpt = getattr(head, "kpt_shape", None)
    # from the architecture (yaml): given a module, guess_model_task trusts args['task'] first, which can be stale
    return ModelInfo(task=guess_model_task(model.yaml), nc=int(head.nc), kpt_shape=tuple(kpt) if kpt else None,
                     params=count_params(model))


def check_pair(teacher: Any, student: Any, imgsz: int) -> list[tuple[int, int]]:
    """Raise ModelError unless the two heads match (task, classes, keypoints, strides); return (student, teacher)
    channels per level."""
    t, s = _inner(teacher), _inner(student)
    check_same_head(_head_info(t), _head_info(s), "teacher", "student")
    tf, sf = feature_channels(t, imgsz), feature_channels(s, imgsz)
    t_strides, s_strides = [x[1] for x in tf], [x[1] for x in sf]
    if t_strides != s_strides:
        raise ModelError(f"teacher head strides {t_strides} differ from student head strides {s_strides}; "
                         "pick a teacher from a family with the same P3-P5 head levels")
    return [(sc, tc) for (sc, _), (tc, _) in zip(sf, tf, strict=True)]


def build_adapters(method: str, channels: list[tuple[int, int]]) -> nn.ModuleDict:
    """Trainable student->teacher projections per level (and the MGD generators), as stock torch layers only."""
    if method == "sl2":  # upstream DistillationModel's projector, layer for layer
        align = [nn.Sequential(nn.Conv2d(s, t, 1), nn.ReLU(inplace=True), nn.Conv2d(t, t, 1)) for s, t in channels]
    elif method in ("mgd", "cwd"):
        align = [nn.Conv2d(s, t, 1) for s, t in channels]
    else:  # logit KD compares head outputs, which already share a shape
        return nn.ModuleDict()
    adapters = nn.ModuleDict({"align": nn.ModuleList(align)})
    if method == "mgd":
        adapters["gen"] = nn.ModuleList(
            nn.Sequential(nn.Conv2d(t, t, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(t, t, 3, padding=1))
            for _, t in channels
        )
    return adapters


def strip_distillation(model: Any) -> nn.Module:
    """Remove adapters and the distillation criterion in place; returns the plain student module."""
    inner = _inner(model)
    if ADAPTERS in inner._modules:
        delattr(inner, ADAPTERS)
    if isinstance(getattr(inner, "criterion", None), DistillCriterion):
        inner.criterion = None
    return inner


def strip_checkpoint(path: str | Path) -> None:
    """Rewrite an Ultralytics checkpoint so its model/EMA are plain students (no adapters)."""
    ckpt = read_checkpoint(path)
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), nn.Module):
            strip_distillation(ckpt[key])
    torch.save(ckpt, path)


# ----------------------------------------------------------------------------------------------------------- teacher
def load_teacher(spec: str | Path | nn.Module) -> nn.Module:
    """The teacher's DetectionModel/PoseModel from a local .pt path or a module."""
    if isinstance(spec, nn.Module):
        return _inner(spec)
    if not Path(spec).is_file():
        raise ModelError(f"distill.teacher: teacher checkpoint {spec!r} not found; train the teacher first")
    return load_checkpoint(spec)[0]


def prepare_teacher(teacher: nn.Module, fuse: bool = True) -> nn.Module:
    """A frozen eval() copy of the teacher, BatchNorm folded into convs when `fuse`; both heads of end-to-end
    models are kept (Detect.fuse would drop one)."""
    teacher = deepcopy(teacher).float().eval()
    if fuse:
        head = teacher.model[-1]
        head.fuse = lambda: None  # keep one2many + one2one: scores for gating average both, like upstream
        try:
            teacher.fuse(verbose=False)
        finally:
            del head.fuse
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillCriterion:
    """Wraps the student's criterion: its loss items plus `dis_loss` = weight * LOSSES[method](student, teacher).

    Like upstream, the item is the weighted loss and the summed loss gets it times the batch size. Pickling or
    deep-copying drops the teacher (EMA copies and checkpoints must not carry it); without a teacher, in eval, or at
    weight 0 the teacher is not run and dis_loss is 0. A batch with `n_labeled` gets the detection loss on its
    first n_labeled images only and the distillation loss on all of them.
    """

    def __init__(self, base: Any, teacher: nn.Module | None, adapters: nn.ModuleDict, cfg: DistillConfig) -> None:
        self.base, self.teacher, self.adapters, self.cfg = base, teacher, adapters, cfg
        self.weight = cfg.base_weight  # set per step by the trainer

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "teacher": None}

    def update(self) -> None:
        """Epoch-end hook the trainer calls on criteria (E2ELoss decays its one2many gain there)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch.get("n_labeled")
        loss, items = self.base(preds if n is None else take_images(preds, n), batch)
        dis = loss.new_zeros(())
        if self.teacher is not None and self.weight > 0 and self.adapters.training and isinstance(preds, dict):
            with torch.inference_mode():
                t_out = head_branches(self.teacher(batch["img"]))
            t_out = clone_tree(t_out)  # outside inference_mode, so the copies are normal tensors
            dis = LOSSES[self.cfg.loss](head_branches(preds), t_out, self.adapters, self.cfg) * self.weight
        items["dis_loss"] = dis.detach()
        return torch.cat([loss, (dis * batch["img"].shape[0]).view(1)]), items


# ----------------------------------------------------------------------------------------------------------- trainer
def _on_epoch_start(trainer: Any) -> None:
    trainer.batch_in_epoch = 0


def _on_batch_start(trainer: Any) -> None:
    """Set this step's distillation weight from the global step (epoch * batches + batch)."""
    nb = len(trainer.train_loader)
    step = trainer.epoch * nb + trainer.batch_in_epoch
    trainer.batch_in_epoch += 1
    cfg = trainer.distill
    trainer.dis_weight = loss_weight(step, trainer.epochs * nb, cfg.base_weight, cfg.schedule,
                                     cfg.off_last_epochs, nb)
    criterion = unwrap_model(trainer.model).criterion
    if isinstance(criterion, DistillCriterion):
        criterion.weight = trainer.dis_weight


def unlabeled_images(folder: str | Path) -> list[str]:
    """Sorted image files under `folder`; DatasetError when it is missing or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"distill.unlabeled: folder {folder} not found; give a folder of images")
    found = sorted(str(p) for p in folder.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
    if not found:
        raise DatasetError(f"distill.unlabeled: no images under {folder}; give a folder of images")
    return found


def _cycle(loader: Any) -> Iterator[dict[str, Any]]:
    while True:
        yield from loader


class UnlabeledImages(Dataset):
    """Every image under a folder, letterboxed to `imgsz`, randomly flipped, as RGB uint8 CHW like the YOLO loader.

    YOLODataset refuses a folder without labels, and no mosaic is needed: only the distillation loss sees these.
    """

    def __init__(self, folder: Path, imgsz: int, flip: float = 0.5) -> None:
        self.files = unlabeled_images(folder)
        self.letterbox, self.flip = LetterBox((imgsz, imgsz)), flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        im = imread(self.files[i])
        if im is None:
            raise DatasetError(f"distill.unlabeled: {self.files[i]} is not a readable image")
        im = self.letterbox(image=im)[..., ::-1]  # BGR -> RGB, as Ultralytics' Format does
        if torch.rand(()) < self.flip:
            im = im[:, ::-1]
        return {"img": torch.from_numpy(im.transpose(2, 0, 1).copy()), "im_file": self.files[i]}


class _DistillMixin:
    """Distillation on top of a stock Ultralytics trainer; pass `distill=` via functools.partial (see make_trainer).

    Single process only: Ultralytics' DDP launcher rebuilds the trainer from `overrides` alone and would lose
    `distill`. Resume needs the same DistillConfig again (it is not stored in the checkpoint).
    """

    def __init__(
        self,
        cfg: Any = DEFAULT_CFG,
        overrides: dict[str, Any] | None = None,
        _callbacks: dict | None = None,
        distill: DistillConfig | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        if distill is None:
            raise ModelError("distillation trainer needs distill=DistillConfig(...); build it with make_trainer()")
        # own copy: Model.train shares its callbacks dict with the trainer, and ours must not leak into it
        _callbacks = {k: list(v) for k, v in _callbacks.items()} if _callbacks else None
        super().__init__(cfg, overrides, _callbacks)
        self.distill = distill
        self.teacher = prepare_teacher(load_teacher(teacher if teacher is not None else distill.teacher),
                                       fuse=distill.fuse_teacher)
        self.dis_weight, self.batch_in_epoch = distill.base_weight, 0
        self._unlabeled: Iterator[dict[str, Any]] | None = None
        self.add_callback("on_train_epoch_start", _on_epoch_start)
        self.add_callback("on_train_batch_start", _on_batch_start)

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """The stock student plus adapters sized from both models, then `weights` (adapters too, when resuming)."""
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)
        channels = check_pair(self.teacher, model, int(self.args.imgsz))
        setattr(model, ADAPTERS, build_adapters(self.distill.loss, channels))
        if weights:
            model.load(weights, verbose=verbose)
        return model

    def _setup_train(self) -> None:
        super()._setup_train()
        self.teacher.to(self.device)
        model = unwrap_model(self.model)
        model.criterion = DistillCriterion(model.init_criterion(), self.teacher, getattr(model, ADAPTERS), self.distill)
        if self.distill.unlabeled:
            self._unlabeled = _cycle(self._unlabeled_loader(Path(self.distill.unlabeled)))

    def _unlabeled_loader(self, folder: Path) -> DataLoader:
        dataset = UnlabeledImages(folder, int(self.args.imgsz))
        workers = min(self.args.workers, 4)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, num_workers=workers,
                          persistent_workers=workers > 0, drop_last=len(dataset) >= self.batch_size)

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Stock preprocessing; then, when distilling, append a batch of unlabeled images (labels untouched)."""
        batch = super().preprocess_batch(batch)
        if self._unlabeled is not None and self.dis_weight > 0:
            extra = next(self._unlabeled)
            img = extra["img"].to(self.device).float() / 255
            if img.shape[2:] != batch["img"].shape[2:]:  # multi-scale resized the labeled batch
                img = nn.functional.interpolate(img, size=batch["img"].shape[2:], mode="bilinear", align_corners=False)
            batch["n_labeled"] = batch["img"].shape[0]
            batch["img"] = torch.cat([batch["img"], img])
            batch["im_file"] = [*batch["im_file"], *extra["im_file"]]
        return batch

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        super().save_metrics({**metrics, "dis/weight": self.dis_weight})

    def final_eval(self) -> None:
        """Strip adapters from best.pt and last.pt (plain student checkpoints), then the stock final validation."""
        if RANK in {-1, 0}:
            for f in (self.last, self.best):
                if f.exists():
                    strip_checkpoint(f)
        super().final_eval()


class DistillDetectionTrainer(_DistillMixin, DetectionTrainer):
    """DetectionTrainer that adds a distillation loss from a frozen teacher (column `dis_loss`)."""


class DistillPoseTrainer(_DistillMixin, PoseTrainer):
    """PoseTrainer that adds a distillation loss from a frozen teacher (column `dis_loss`)."""


def make_trainer(cfg: DistillConfig, task: str = "detect", teacher: nn.Module | None = None) -> Callable[..., Any]:
    """Trainer factory for `YOLO.train(trainer=...)`: the task's distillation trainer bound to `cfg`."""
    trainers = {"detect": DistillDetectionTrainer, "pose": DistillPoseTrainer}
    if task not in trainers:
        raise ModelError(f"distillation supports tasks {', '.join(trainers)}, not {task!r}")
    return functools.partial(trainers[task], distill=cfg, teacher=teacher)


# ------------------------------------------------------------------------------------------------- stage support
def check_teacher(teacher: str | Path, key: str, student: Any, data: ModelInfo, data_name: str, imgsz: int) -> None:
    """Before training: the teacher file loads, predicts the dataset's task/classes/keypoints and has the student's
    head strides. The student may still be an 80-class yaml build (the trainer resizes it), so only strides are
    compared with it."""
    t = load_model(teacher, key)
    check_same_head(model_info(t), data, f"teacher {teacher}", f"the dataset {data_name}")
    t_strides = [s for _, s in feature_channels(t, imgsz)]
    s_strides = [s for _, s in feature_channels(student, imgsz)]
    if t_strides != s_strides:
        raise ModelError(f"teacher {teacher} head strides {t_strides} differ from student head strides {s_strides}; "
                         "pick a teacher from a family with the same P3-P5 head levels")


def checked_inputs(student: TrainConfig, data_dir: Path, teacher: Path) -> tuple[YOLO, ModelInfo]:
    """Before training: the student built from `student.model` and the dataset's head, with the student and the
    `teacher` .pt (distill.teacher) checked against the prepared dataset in `data_dir`."""
    data = dataset_head(load_summary(data_dir))
    model = load_model(student.model, "student.model")
    check_task(model, "student.model", student.model, data, data_dir)
    check_teacher(teacher, "distill.teacher", model, data, str(data_dir), student.imgsz)
    return model, data


def check_native(cfg: DistillConfig) -> None:
    """sl2 runs Ultralytics' own distillation, which has no weight schedule and no unlabeled images: refuse, rather
    than silently ignore, settings it cannot honour."""
    if cfg.loss != "sl2":
        return
    if cfg.schedule != "constant":
        raise ParamsError(f"distill.schedule: sl2 is Ultralytics' native distillation with a constant weight, got "
                          f"{cfg.schedule!r}; use schedule constant or another loss (mgd, cwd, logit)")
    if cfg.unlabeled:
        raise ParamsError("distill.unlabeled: sl2 is Ultralytics' native distillation, which trains on labeled "
                          "images only; set unlabeled '' or use another loss (mgd, cwd, logit)")


def training_setup(cfg: DistillConfig, teacher: str | Path, task: str) -> dict[str, Any]:
    """Keyword arguments for `training.train_model`: sl2 -> the stock trainer with Ultralytics' native
    `distill_model`/`dis`; the other losses -> this module's trainer."""
    check_native(cfg)
    if cfg.loss == "sl2":
        # absolute: the trainer stores it in last.pt and rebuilds the teacher from it on resume
        return {"extra_args": {"distill_model": str(Path(teacher).resolve()), "dis": cfg.base_weight}}
    return {"trainer": make_trainer(dataclasses.replace(cfg, teacher=str(teacher)), task)}


def plain_student_checkpoint(path: str | Path) -> None:
    """Rewrite a finished distillation checkpoint in place as a plain student: no adapters, no teacher, no
    DistillationModel wrapper, and no `distill_model`/`dis` training args that would point at the teacher."""
    ckpt = read_checkpoint(path)
    for key in ("model", "ema"):
        if isinstance(ckpt.get(key), DistillationModel):
            ckpt[key]._remove_feature_hooks()  # else the student would pickle upstream's FeatureHooks
            ckpt[key] = ckpt[key].student_model
        if isinstance(ckpt.get(key), nn.Module):
            strip_distillation(ckpt[key])
            args = getattr(ckpt[key], "args", None)
            if isinstance(args, dict):
                ckpt[key].args = {**args, "distill_model": None}
    if isinstance(ckpt.get("train_args"), dict):
        ckpt["train_args"] = {**ckpt["train_args"], "distill_model": None}
    torch.save(ckpt, path)
