"""Shared fixtures: every test gets its own MLflow store and Ultralytics settings dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from yolo_compress.models import YOLO

from .tiny_pipeline import REPO, make_repo

__all__ = ["REPO"]


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The whole pipeline run once on tiny params in a git + DVC copy of this repo; tests must leave it as found."""
    return make_repo(tmp_path_factory.mktemp("e2e") / "repo")


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store per test; nothing leaks into the repo's mlflow.db."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return uri


def random_model(path: Path, nc: int = 2, pose: bool = False) -> Path:
    """A randomly initialised yolo11n(-pose, K = 5) with `nc` classes saved as a .pt (no training, no download)."""
    from ultralytics.nn.tasks import DetectionModel, PoseModel

    if pose:
        model = YOLO("yolo11n-pose.yaml")
        model.model = PoseModel("yolo11n-pose.yaml", nc=nc, data_kpt_shape=(5, 3), verbose=False)
    else:
        model = YOLO("yolo11n.yaml")
        model.model = DetectionModel("yolo11n.yaml", nc=nc, verbose=False)
    model.model.names = {i: f"c{i}" for i in range(nc)}
    model.ckpt = {"train_args": {"task": model.task}}  # else the loader takes the default task, detect
    model.save(path)
    return path
