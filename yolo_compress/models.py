"""Loading YOLO models offline, describing them, and checking that two models fit together.

Ultralytics' offline settings are set by the package entry (yolo_compress/__init__.py) before any Ultralytics import.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ultralytics.nn.tasks as ultralytics_tasks
from ultralytics import YOLO
from ultralytics.engine.model import Model
from ultralytics.nn.modules.block import AAttn, Attention
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import BaseModel, torch_safe_load
from ultralytics.utils.torch_utils import get_flops

from yolo_compress.errors import ModelError
from yolo_compress.splitfree import PROJECT_CLASSES  # noqa: F401 - importing it puts them on torch's allow-list

if TYPE_CHECKING:  # annotations only: torch imported here, before Ultralytics, would get another thread count
    from torch import nn

__all__ = ["YOLO", "MADE_BY", "ModelInfo", "dataset_head", "check_task", "load_model", "model_info", "check_same_head",
           "model_size", "pipeline_models", "set_checkpoint_trust", "read_checkpoint",
           "count_params", "fixed_blocks", "is_pruned_yaml", "PRUNED_YAML_KEY", "unwrap_yolo", "trained_epochs"]

MADE_BY = {"teacher": "train_teacher", "student": "train_student", "distilled": "distill", "pruned": "prune"}

# Written into a pruned checkpoint's model.yaml: the yaml still describes the unpruned widths and must not be rebuilt.
PRUNED_YAML_KEY = "pruned"
PRUNED_YAML_NOTE = ("channel widths differ from this yaml: load the pickled module (YOLO(path)) and fine-tune with "
                    "yolo_compress.prune.rounds.finetune; a stock trainer would rebuild the unpruned model from this "
                    "yaml")


def unwrap_yolo(model: Model | nn.Module) -> nn.Module:
    """The torch module inside an Ultralytics `YOLO` wrapper, or `model` itself."""
    return model.model if isinstance(model, Model) else model


def fixed_blocks(model: Model | nn.Module) -> list[nn.Module]:
    """The blocks compression leaves as they are, in module order: every Attention/AAttn block and the Detect/Pose
    head. torch-pruning hung tracing through attention, and the head's outputs are the predictions."""
    return [m for m in unwrap_yolo(model).modules() if isinstance(m, (Attention, AAttn, Detect))]


def is_pruned_yaml(cfg: Any) -> bool:
    """Whether a model.yaml dict belongs to a pruned model (its widths are stale)."""
    return isinstance(cfg, dict) and PRUNED_YAML_KEY in cfg


@dataclass(frozen=True)
class ModelInfo:
    """What must match between a teacher and a student, plus size."""

    task: str  # (str) detect | pose | ...
    nc: int  # (int) number of classes
    kpt_shape: tuple[int, int] | None  # (tuple) keypoints per object and values per keypoint, pose only
    params: int  # (int) parameter count


def load_model(spec: str | Path, key: str) -> YOLO:
    """Build from a model yaml or load a local .pt; `key` names the params key in errors."""
    spec = str(spec)
    if spec.endswith(".pt"):
        if not Path(spec).is_file():
            raise ModelError(f"{key}: model file {spec} not found; train it first or fix the path")
        try:
            loaded = YOLO(spec)
        except Exception as err:  # noqa: BLE001 - Ultralytics raises many types for a bad file
            raise ModelError(f"{key}: {spec} {why_not_loadable(spec, err)}") from None
        if not isinstance(loaded.model, BaseModel):  # YOLO() accepts any nn.Module under a 'model' key
            cls = type(loaded.model)
            raise ModelError(f"{key}: {spec} holds a {cls.__module__}.{cls.__qualname__}, a model of another "
                             "library, not an Ultralytics YOLO model")
        return loaded
    try:
        return YOLO(spec)
    except FileNotFoundError:
        raise ModelError(f"{key}: model yaml {spec} not found; use e.g. yolo11n.yaml or a local .yaml/.pt") from None


def set_checkpoint_trust(trusted: bool) -> None:
    """params `trust_checkpoints`: False (default) loads every .pt with the weights_only unpickler; True unpickles
    fully, which runs whatever code the file carries. Applies to this process and to those it starts."""
    # Ultralytics reads ULTRALYTICS_SAFE_LOAD into this module global once, at import; set both.
    ultralytics_tasks.SAFE_LOAD = not trusted
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "0" if trusted else "1"


def refused_global(path: str | Path) -> str | None:
    """The first global of checkpoint `path` that torch's weights_only unpickler would refuse, after the loader
    allowed what it knows (Ultralytics' and this project's classes); None when trusted or nothing is refused."""
    if not ultralytics_tasks.SAFE_LOAD:
        return None
    import torch  # late: see the TYPE_CHECKING import above

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a torch.save archive at all: why_not_loadable says what it is instead
        return None
    return unsafe[0] if unsafe else None


def why_not_loadable(path: str | Path, err: BaseException) -> str:
    """Why loading checkpoint `path` failed with `err`, as the end of a one-line message (after the path)."""
    name = refused_global(path)
    if name is not None:
        return _refused(name)
    head = Path(path).read_bytes()[:64]
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # a torch.save zip, or a legacy raw pickle
        kind = "text" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "binary data"
        return (f"is not a PyTorch checkpoint: neither a torch.save archive nor a pickle (it starts with {kind} "
                f"{head[:16]!r})")
    import torch

    try:  # the globals Ultralytics allows are registered by now (by the load that failed)
        ckpt = torch.load(path, map_location="cpu", weights_only=bool(ultralytics_tasks.SAFE_LOAD))
    except Exception:  # noqa: BLE001 - unreadable even as a plain checkpoint: name what failed
        return f"is not a readable PyTorch checkpoint ({_first_line(err)})"
    if not isinstance(ckpt, dict):
        return f"holds a {type(ckpt).__module__}.{type(ckpt).__qualname__}, not an Ultralytics checkpoint dict"
    model = ckpt.get("ema") or ckpt.get("model")
    if model is None:
        keys = ", ".join(map(str, list(ckpt)[:6])) or "none"
        return (f"is a dict without a 'model' entry (keys: {keys}): a bare state_dict or another tool's checkpoint, "
                "not one Ultralytics saved; use a .pt written by Ultralytics' training or YOLO.save()")
    cls = type(model)
    if not cls.__module__.startswith(("ultralytics.", "yolo_compress.")):
        return f"holds a {cls.__module__}.{cls.__qualname__}, a model of another library, not an Ultralytics YOLO model"
    return f"is not an Ultralytics YOLO checkpoint ({_first_line(err)})"


def _refused(name: str) -> str:
    return (f"holds {name}, which only full unpickling can load, and that can run any code; if you trust this file, "
            "set `trust_checkpoints: true` in params.yaml")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:120]}" if text else type(err).__name__


def read_checkpoint(path: str | Path, key: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint dict of a .pt, loaded as Ultralytics loads models (weights_only unless trusted)."""
    try:
        return torch_safe_load(path)[0]
    except Exception:  # noqa: BLE001 - only a refused global gets its own message
        name = refused_global(path)
        if name is None:
            raise
        raise ModelError(f"{key}: {path} {_refused(name)}") from None


def count_params(model: Model | nn.Module) -> int:
    """Number of parameters (every tensor, trainable or not) of a module, or of the one inside a YOLO wrapper."""
    return sum(p.numel() for p in unwrap_yolo(model).parameters())


def model_info(model: YOLO) -> ModelInfo:
    """Task, classes, keypoint shape and parameter count of a loaded model."""
    inner = model.model
    kpt = getattr(inner, "kpt_shape", None) or getattr(inner.model[-1], "kpt_shape", None)
    return ModelInfo(
        task=model.task,
        nc=len(inner.names),
        kpt_shape=tuple(kpt) if kpt else None,
        params=count_params(inner),
    )


def trained_epochs(model: YOLO) -> int | None:
    """The epochs of the training run that made a checkpoint (Ultralytics' `train_args`), None where it has none."""
    epochs = ((getattr(model, "ckpt", None) or {}).get("train_args") or {}).get("epochs")
    return int(epochs) if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) else None


def check_same_head(a: ModelInfo, b: ModelInfo, a_name: str, b_name: str) -> None:
    """Raise ModelError when two models differ in task, class count or keypoint shape."""
    for field in ("task", "nc", "kpt_shape"):
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            raise ModelError(f"{a_name} has {field} {va} but {b_name} has {field} {vb}; both must be trained on the "
                             "same dataset (same task, classes and keypoints)")


def model_size(path: str | Path, imgsz: int) -> dict[str, float]:
    """Parameters (millions), GFLOPs at `imgsz` (Ultralytics/thop count) and file size of a checkpoint."""
    model = YOLO(str(path)).model
    return {
        "params_m": count_params(model) / 1e6,
        "gflops": float(get_flops(model, imgsz)),
        "size_mb": Path(path).stat().st_size / 1e6,
    }


def pipeline_models(models_dir: Path, names: list[str], key: str) -> dict[str, Path]:
    """`<models_dir>/<name>.pt` per name; ModelError naming the stage that makes a missing one (`key`: params list)."""
    paths = {name: Path(models_dir) / f"{name}.pt" for name in names}
    for name, pt in paths.items():
        if not pt.is_file():
            raise ModelError(f"{key} lists '{name}' but {pt} does not exist; make it with "
                             f"`dvc repro {MADE_BY.get(name, name)}` or remove '{name}' from {key}")
    return paths


def dataset_head(summary: dict) -> ModelInfo:
    """What a model must predict for a prepared dataset, from its dataset.json summary."""
    kpt = summary.get("kpt_shape")
    return ModelInfo(summary["task"], summary["nc"], tuple(kpt) if kpt else None, 0)


def check_task(model: YOLO, key: str, spec: str | Path, data: ModelInfo, data_path: str | Path) -> None:
    """ModelError when a model of another task is asked to train on the dataset (classes are set by the data)."""
    if model.task != data.task:
        example = "yolo11n-pose.yaml" if data.task == "pose" else "yolo11n.yaml"
        raise ModelError(f"{key}: {spec} is a {model.task} model but the dataset {data_path} is {data.task}; pick a "
                         f"{data.task} model (e.g. {example})")

