"""Loading YOLO models offline, describing them, and checking that two models fit together.

Ultralytics' offline settings are set by the package entry (yolo_compress/__init__.py) before any Ultralytics import.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ultralytics.nn.tasks as ultralytics_tasks
from ultralytics import YOLO
from ultralytics.engine.model import Model
from ultralytics.nn.modules.block import AAttn, Attention
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import torch_safe_load
from ultralytics.utils.torch_utils import get_flops

from yolo_compress.errors import ModelError
from yolo_compress.splitfree import PROJECT_CLASSES  # noqa: F401 - importing it puts them on torch's allow-list

if TYPE_CHECKING:  # annotations only: torch imported here, before Ultralytics, would get another thread count
    from torch import nn

__all__ = ["YOLO", "MADE_BY", "ModelInfo", "dataset_head", "check_task", "load_model", "model_info", "check_same_head",
           "model_size", "pipeline_models", "set_checkpoint_trust", "read_checkpoint",
           "count_params", "fixed_blocks", "is_pruned_yaml", "PRUNED_YAML_KEY", "unwrap_yolo"]

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
            return YOLO(spec)
        except Exception as err:  # noqa: BLE001 - Ultralytics raises many types for a bad file
            _raise_if_refused(err, key, spec)
            raise ModelError(f"{key}: {spec} is not an Ultralytics YOLO checkpoint ({type(err).__name__})") from None
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


def _refused_global(err: BaseException) -> str | None:
    """The pickled global a weights_only load refused somewhere in `err`'s chain, else None."""
    seen: BaseException | None = err
    while seen is not None:
        # only a refused global means "needs full unpickling": a file that is no pickle at all also fails weights_only
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(seen))
        if isinstance(seen, pickle.UnpicklingError) and found:
            return found.group(1)
        seen = seen.__cause__ or seen.__context__
    return None


def _raise_if_refused(err: BaseException, key: str, path: str | Path) -> None:
    name = _refused_global(err)
    if name is not None:
        raise ModelError(f"{key}: {path} holds {name}, which only full unpickling can load, and that can run any "
                         "code; if you trust this file, set `trust_checkpoints: true` in params.yaml") from None


def read_checkpoint(path: str | Path, key: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint dict of a .pt, loaded as Ultralytics loads models (weights_only unless trusted)."""
    try:
        return torch_safe_load(path)[0]
    except Exception as err:  # noqa: BLE001 - only a refused global gets its own message
        _raise_if_refused(err, key, path)
        raise


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

