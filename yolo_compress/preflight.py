"""The checks `prepare` runs before any training, so that a mistake stops the pipeline before the first epoch.

Each later stage checks its own inputs too; these are the ones that would otherwise surface only hours later.
"""

from __future__ import annotations

from pathlib import Path

from yolo_compress.config import Params
from yolo_compress.data.prepared import load_summary
from yolo_compress.devices import check_device
from yolo_compress.errors import ModelError
from yolo_compress.models import MADE_BY, check_same_head, check_task, dataset_head, load_model, model_info
from yolo_compress.splitfree import check_prunable
from yolo_compress.train.distill import feature_channels

__all__ = ["check_devices", "check_params_models"]

def check_devices(params: Params) -> None:
    """Every device params.yaml names exists on this machine (ParamsError naming the key): the training stages and
    the benchmark check their own again, but only when they start, after the stages before them have run."""
    for key, device in (("teacher.device", params.teacher.device), ("student.device", params.student.device),
                        ("benchmark.device", params.benchmark.device)):
        check_device(device, key)


STRIDE_PROBE_IMGSZ = 128  # image side for reading head strides: divisible by every stride Ultralytics builds (8-64)


def check_params_models(params: Params, prepared_dir: str | Path) -> None:
    """Check every model params.yaml names against the prepared dataset, before any training (prepare calls it).

    - teacher.model, student.model: the file exists and loads (a .yaml builds) and its task is the dataset's. Classes
      and keypoints are not compared: the trainer re-heads a .pt to the dataset (fine-tuning a COCO .pt is normal).
    - distill.teacher, prune.model are used as they are: task, classes and keypoints must match the data. When they
      name a model this pipeline trains (models/teacher.pt ...), which does not exist yet, its architecture is checked.
    - The distillation teacher has the student's head strides, and the model prune starts from has no block
      torch-pruning cannot follow.
    Raises ModelError naming the params key; without this each mistake surfaced only in its own stage, hours later.
    """
    data = dataset_head(load_summary(prepared_dir))
    built = {}
    for key, spec in (("teacher.model", params.teacher.model), ("student.model", params.student.model)):
        built[key] = load_model(spec, key)
        check_task(built[key], key, spec, data, prepared_dir)

    def used_as_is(key: str, spec: str) -> tuple[str, str]:
        """(key, spec) of the model to check for params `key`: its architecture when the pipeline trains it."""
        made_here = Path(spec).parent == Path("models") and Path(spec).stem in MADE_BY
        if made_here:
            return ("teacher.model", params.teacher.model) if Path(spec).stem == "teacher" else \
                ("student.model", params.student.model)
        built[key] = load_model(spec, key)
        check_same_head(model_info(built[key]), data, f"{key} {spec}", f"dataset {prepared_dir}")
        return key, spec

    teacher_key, teacher_spec = used_as_is("distill.teacher", params.distill.teacher)
    t_strides = [s for _, s in feature_channels(built[teacher_key], STRIDE_PROBE_IMGSZ)]
    s_strides = [s for _, s in feature_channels(built["student.model"], STRIDE_PROBE_IMGSZ)]
    if t_strides != s_strides:
        raise ModelError(f"{teacher_key}: {teacher_spec} has head strides {t_strides} but student.model "
                         f"{params.student.model} has {s_strides}; distillation needs the same head levels, so pick "
                         "a teacher and a student of one family (e.g. yolo11s and yolo11n)")
    prune_key, prune_spec = used_as_is("prune.model", params.prune.model)
    check_prunable(built[prune_key].model, f"{prune_key}: {prune_spec}")
