"""Shared fixtures: every test gets its own MLflow store and Ultralytics settings dir."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from yolo_compress.models import YOLO

from .tiny_pipeline import REPO, make_repo

__all__ = ["REPO", "MlflowServer", "free_port"]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, pin each worker (and every process it starts) to one core of its own.

    Unpinned, each worker's torch would size its thread pool to every core, and a training epoch beside another such
    job ran 4-7x slower (docs/measured-facts.md); pinned, the code's own sizing (devices.all_cores) reads the affinity
    mask and uses the one core.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})
        torch.set_num_threads(1)  # torch was imported above, its pool sized before the pinning


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on loopback: SQLite backend, artifacts served through the server (as in the README).

    `stop()` kills it like a crash would; `start()` brings it back on the same port and store.
    """

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> None:
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or accepted but slow to answer
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)


@pytest.fixture
def restartable_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started `MlflowServer` under tmp_path/mlflow-server, stopped at the end."""
    (tmp_path / "mlflow-server").mkdir()
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture
def mlflow_server(restartable_mlflow_server: MlflowServer) -> str:
    """The URI of a started `mlflow server` on loopback."""
    return restartable_mlflow_server.uri
