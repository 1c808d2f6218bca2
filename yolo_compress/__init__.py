"""yolo-compress: distill and prune Ultralytics YOLO detectors in a DVC pipeline.

Importing any module of this package first runs this file, which is the one place that sets Ultralytics' offline
settings. So `import yolo_compress.<anything>` may come before or after `import ultralytics` in any module.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

# Ultralytics reads these at its import: keep its settings file out of the user's home, never go online.
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.cwd() / ".ultralytics"))
os.environ.setdefault("YOLO_OFFLINE", "1")
# NNCF (openvino_int8 export) sends usage telemetry unless this is set; with no network its sender process hung the
# export stage's exit for minutes. OpenVINO's own converter telemetry is avoided by reading ONNX with Core.read_model.
os.environ.setdefault("NNCF_CI", "1")
# A .pt is a pickle, and unpickling can run any code: load with torch's weights_only unpickler and Ultralytics'
# allow-list of model classes, in this process and in the processes it starts (DDP). `trust_checkpoints: true` in
# params.yaml switches full unpickling back on (models.set_checkpoint_trust).
os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")

# Stages log to MLflow themselves (one run per stage, no weight uploads); Ultralytics' own mlflow and dvc (dvclive)
# callbacks would open stray experiments and duplicate uploads, and `sync` phones home.
INTEGRATIONS_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


def switch_off_integrations(settings: Any) -> None:
    """Set every INTEGRATIONS_OFF key of Ultralytics' SETTINGS to False (it saves them to its settings file)."""
    if any(settings.get(k) for k in INTEGRATIONS_OFF):
        settings.update({k: False for k in INTEGRATIONS_OFF})


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then(module)` right after module `name` is first imported, by whichever import comes first."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the regular finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            self.then(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


# Ultralytics builds SETTINGS in ultralytics.utils and reads the integration keys when it builds a trainer. Importing
# it here would load torch early (and Ultralytics sets OMP_NUM_THREADS=1 first, which changes torch's thread count for
# the stages that import torch before it), so the keys are switched off as soon as anyone imports it.
if "ultralytics.utils" in sys.modules:
    switch_off_integrations(sys.modules["ultralytics.utils"].SETTINGS)
else:
    sys.meta_path.insert(0, _AfterImport("ultralytics.utils", lambda m: switch_off_integrations(m.SETTINGS)))
