"""Typed view of params.yaml: one dataclass per section, validated on load.

Every key has a `# (type) meaning` comment. Unknown keys, wrong types and
out-of-range values raise `ParamsError` naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yolo_compress.errors import ParamsError

TASKS = ("detect", "pose")
OPTIMIZERS = ("SGD", "Adam", "AdamW", "auto")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ParamsError(f"{key}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """`data:` section, read by the prepare stage."""

    source: str = "synthetic"  # (str) 'synthetic', or a path to your own Ultralytics dataset yaml
    task: str = "detect"  # (str) synthetic task: detect | pose
    image_size: int = 256  # (int) synthetic image side in pixels
    classes: int = 6  # (int) synthetic detect classes, at least 6 (pose always has 1)
    keypoints: int = 11  # (int) synthetic pose keypoints per figure
    max_objects: int = 8  # (int) most labelled objects per synthetic image
    train_images: int = 400  # (int) synthetic images in train
    val_images: int = 100  # (int) synthetic images in val
    test_images: int = 100  # (int) synthetic images in test
    test_shift_images: int = 100  # (int) synthetic images in test_shift (other backgrounds and scales)

    def __post_init__(self) -> None:
        _check(self.task in TASKS, "task", f"one of {', '.join(TASKS)}", self.task)
        _check(self.source != "", "source", "'synthetic' or a dataset yaml path", self.source)
        _check(64 <= self.image_size <= 2048, "image_size", "an int in [64, 2048]", self.image_size)
        _check(6 <= self.classes <= 80, "classes", "an int in [6, 80]", self.classes)
        _check(5 <= self.keypoints <= 17, "keypoints", "an int in [5, 17]", self.keypoints)
        _check(1 <= self.max_objects <= 50, "max_objects", "an int in [1, 50]", self.max_objects)
        for split in ("train", "val", "test", "test_shift"):
            n = getattr(self, f"{split}_images")
            _check(n >= 1, f"{split}_images", "an int >= 1 (an empty split cannot be trained or scored)", n)


@dataclass(frozen=True)
class TrainConfig:
    """`teacher:` and `student:` sections, read by the train stage of that role."""

    model: str  # (str) Ultralytics model yaml (built from scratch, e.g. yolo11n.yaml) or a local .pt file
    epochs: int = 10  # (int) training epochs
    imgsz: int = 256  # (int) train and val image size in pixels, a multiple of 32
    batch: int = 16  # (int) images per batch
    lr0: float = 0.002  # (float) initial learning rate
    optimizer: str = "AdamW"  # (str) SGD | Adam | AdamW | auto ('auto' ignores lr0)
    warmup_epochs: float = 1.0  # (float) linear warm-up epochs
    mosaic: float = 1.0  # (float) mosaic augmentation probability
    close_mosaic: int = 2  # (int) turn mosaic off for the last N epochs
    workers: int = 2  # (int) dataloader worker processes
    device: str = "cpu"  # (str) 'cpu', a GPU index like '0', or a list like '0,1' (DDP)

    def __post_init__(self) -> None:
        _check(self.model.endswith((".yaml", ".yml", ".pt")), "model", "a model .yaml or a local .pt path", self.model)
        _check(self.epochs >= 1, "epochs", "an int >= 1", self.epochs)
        _check(self.imgsz >= 32 and self.imgsz % 32 == 0, "imgsz", "a multiple of 32, >= 32", self.imgsz)
        _check(self.batch >= 1, "batch", "an int >= 1", self.batch)
        _check(0 < self.lr0 < 1, "lr0", "a float in (0, 1)", self.lr0)
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        _check(self.warmup_epochs >= 0, "warmup_epochs", "a float >= 0", self.warmup_epochs)
        _check(0 <= self.mosaic <= 1, "mosaic", "a float in [0, 1]", self.mosaic)
        _check(self.close_mosaic >= 0, "close_mosaic", "an int >= 0", self.close_mosaic)
        _check(self.workers >= 0, "workers", "an int >= 0", self.workers)


@dataclass(frozen=True)
class StudentConfig(TrainConfig):
    """`student:` section: a TrainConfig plus the teacher check."""

    min_teacher_gap: float = 0.05  # (float) warn loudly when teacher val mAP50-95 minus the student's is below this

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.min_teacher_gap < 1, "min_teacher_gap", "a float in [0, 1)", self.min_teacher_gap)


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    data: DataConfig = field(default_factory=DataConfig)  # (section) dataset for prepare
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(model="yolo11n.yaml"))  # (section) teacher
    student: StudentConfig = field(default_factory=lambda: StudentConfig(model="yolo11n.yaml"))  # (section) student
    seed: int = 0  # (int) global seed: data generation, initialisation, augmentation

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", "an int >= 0", self.seed)


def _is_number_text(value: Any) -> bool:
    # YAML 1.1 reads `1e-3` (no dot) as a string; users mean a float.
    try:
        return isinstance(value, str) and float(value) == float(value)
    except ValueError:
        return False


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _is_number_text(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; `prefix` names the section."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"unknown key '{prefix}{unknown[0]}'; valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
            continue
        if not _type_ok(value, tp):
            tname = getattr(tp, "__name__", str(tp))
            raise ParamsError(f"{prefix}{name}: expected {tname}, got {value!r} ({type(value).__name__})")
        kwargs[name] = float(value) if tp is float else value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParamsError(f"missing key '{prefix}{missing[0]}'")
    try:
        return cls(**kwargs)
    except ParamsError as err:
        msg = str(err)
        # Section validators name their own keys; prepend the section so the key is complete.
        raise ParamsError(msg if msg.startswith(prefix) or not prefix else f"{prefix}{msg}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate params.yaml; raise ParamsError with a one-line message on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; run from the repo root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    try:
        return _build(Params, raw, "")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def section_dict(section: Any) -> dict[str, Any]:
    """Plain dict of one params section, for logging."""
    return dataclasses.asdict(section)

