"""Distillation from a frozen teacher into a YOLO student: alignment checks, adapters, the teacher, the criterion.

Design (docs/measured-facts.md, custom losses on the trainer); the trainer side is yolo_compress.train.trainer:
- Adapters are a `distill_adapters` ModuleDict of stock torch layers registered on the STUDENT model, so the optimizer
  sees them and DDP syncs their gradients; the trainer keeps them out of its checkpoints (plain students).
- The teacher is owned by the trainer, not the model: the trainer's freeze loop, optimizer, EMA and checkpoints
  never see it. It runs frozen, in eval(), BatchNorm-folded, under torch.inference_mode().
- No forward hooks are kept: the head's training output already carries its inputs ('feats'), so the loss reads
  student and teacher features from the outputs and nothing has to survive pickling or the EMA deepcopy.
- The loss is added by wrapping the student's own criterion, so `dis_loss` is one more loss item (a column in
  results.csv) and the trainer's loop stays untouched. Its weight follows a schedule by global step.
"""

from __future__ import annotations

import math
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from ultralytics.data.augment import LetterBox
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.nn.modules.conv import Conv, Conv2
from ultralytics.nn.tasks import guess_model_task, load_checkpoint
from ultralytics.utils.patches import imread
from ultralytics.utils.torch_utils import fuse_conv_and_bn

from yolo_compress.config import DISTILL_LOSSES, DISTILL_SCHEDULES, DistillConfig, TrainConfig
from yolo_compress.data.prepared import load_summary
from yolo_compress.errors import DatasetError, ModelError
from yolo_compress.models import (
    YOLO,
    ModelInfo,
    check_same_head,
    check_task,
    count_params,
    dataset_head,
    load_model,
    model_info,
)
from yolo_compress.train.distill_losses import LOSSES, clone_tree, head_branches, split_keypoints, take_images

__all__ = [
    "ADAPTERS",
    "METHODS",
    "DistillCriterion",
    "UnlabeledImages",
    "build_adapters",
    "check_pair",
    "check_teacher",
    "checked_inputs",
    "distill_layers",
    "feature_channels",
    "fold_batchnorm",
    "load_teacher",
    "loss_weight",
    "prepare_teacher",
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


# ----------------------------------------------------------------------------------------------------------- teacher
def load_teacher(spec: str | Path | nn.Module) -> nn.Module:
    """The teacher's DetectionModel/PoseModel from a local .pt path or a module."""
    if isinstance(spec, nn.Module):
        return _inner(spec)
    if not Path(spec).is_file():
        raise ModelError(f"distill.teacher: teacher checkpoint {spec!r} not found; train the teacher first")
    return load_checkpoint(spec)[0]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold each Conv's BatchNorm into its conv weights, in place (eval only): what Ultralytics' `fuse()` does to
    convs, with both heads of end-to-end models kept (Detect.fuse would drop one2many, which upstream's sl2 scores
    average in)."""
    for m in model.modules():
        # Conv2 adds a second branch before its BN, which a fold into one conv would get wrong: left as it is
        if isinstance(m, Conv) and not isinstance(m, Conv2) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
            m.conv, m.bn = fuse_conv_and_bn(m.conv, m.bn), nn.Identity()
    return model


def prepare_teacher(teacher: nn.Module, fuse: bool = True) -> nn.Module:
    """A frozen eval() copy of the teacher, BatchNorm folded into convs when `fuse`."""
    teacher = deepcopy(teacher).float().eval()
    if fuse:
        fold_batchnorm(teacher)
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
        self.kpt_shape = getattr(teacher.model[-1], "kpt_shape", None) if teacher is not None else None
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
            t_out = split_keypoints(clone_tree(t_out), self.kpt_shape)  # clone outside inference_mode: normal tensors
            s_out = split_keypoints(head_branches(preds), self.kpt_shape)
            dis = LOSSES[self.cfg.loss](s_out, t_out, self.adapters, self.cfg) * self.weight
        items["dis_loss"] = dis.detach()
        return torch.cat([loss, (dis * batch["img"].shape[0]).view(1)]), items


# -------------------------------------------------------------------------------------------------------- unlabeled
def unlabeled_images(folder: str | Path) -> list[str]:
    """Sorted image files under `folder`; DatasetError when it is missing or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"distill.unlabeled: folder {folder} not found; give a folder of images")
    found = sorted(str(p) for p in folder.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)
    if not found:
        raise DatasetError(f"distill.unlabeled: no images under {folder}; give a folder of images")
    return found


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


def checked_inputs(student: TrainConfig, data_dir: Path, teacher: Path) -> YOLO:
    """Before training: the student built from `student.model`, with it and the `teacher` .pt (distill.teacher)
    checked against the prepared dataset in `data_dir`."""
    data = dataset_head(load_summary(data_dir))
    model = load_model(student.model, "student.model")
    check_task(model, "student.model", student.model, data, data_dir)
    check_teacher(teacher, "distill.teacher", model, data, str(data_dir), student.imgsz)
    return model
