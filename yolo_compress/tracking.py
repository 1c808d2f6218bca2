"""MLflow for stages: where the store is, one run per stage execution, a parent run per pipeline invocation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import psutil
import requests
from filelock import FileLock
from mlflow.tracking import MlflowClient

from yolo_compress.errors import UserError

log = logging.getLogger(__name__)

EXPERIMENT = "yolo-compress"
PIPELINE_TAG = "yolo_compress.pipeline_id"


def repo_root() -> Path:
    """The real repo: DVC_ROOT under `dvc repro` / `dvc exp run --queue` (whose cwd is a temp copy), else cwd."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite file at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _check_server(uri: str) -> None:
    # MLflow's client retries an unreachable server for minutes; ask its health endpoint once, quickly.
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise UserError(
            f"MLflow server {uri} is unreachable ({type(err).__name__}); start it (see README) "
            "or unset MLFLOW_TRACKING_URI to use the local SQLite file"
        ) from None


def open_experiment(uri: str) -> tuple[MlflowClient, str]:
    """A client of the store at `uri` and the experiment's id, created if needed.

    A fresh local SQLite store keeps artifacts beside mlflow.db, not in the cwd.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    try:
        if uri.startswith("sqlite:///"):
            # Parallel queue workers creating a fresh SQLite store at once corrupted it (an alembic race; the client
            # creates the tables as soon as it is built): whoever comes first creates it while the others wait.
            with FileLock(f"{uri.removeprefix('sqlite:///')}.lock", timeout=300):
                client = MlflowClient(uri)
                return client, _get_or_create(client, (repo_root() / "mlartifacts").as_uri())
        client = MlflowClient(uri)
        return client, _get_or_create(client, None)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable; say so before training
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"MLflow store {uri} is not usable ({first}); "
            "start the server or unset MLFLOW_TRACKING_URI to use the local SQLite file"
        ) from None


def _get_or_create(client: MlflowClient, artifact_location: str | None) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def git_commit() -> str:
    """HEAD of the repo, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pipeline_id() -> str | None:
    """Identity of the `dvc repro` / `dvc exp run` process that launched this stage, or None when run by hand.

    DVC gives stages no invocation id, so the nearest dvc ancestor process (pid + start time) stands in for one.
    """
    try:
        for proc in psutil.Process().parents():
            if any(Path(arg).name in ("dvc", "dvc.exe") for arg in proc.cmdline()[:3]):
                key = f"{socket.gethostname()}:{proc.pid}:{proc.create_time()}:{os.environ.get('DVC_EXP_NAME')}"
                return hashlib.sha256(key.encode()).hexdigest()[:16]
    except psutil.Error:
        pass
    return None


def _pipeline_parent(client: MlflowClient, exp_id: str, pid: str, exp_name: str) -> str:
    found = client.search_runs([exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{pid}' and tags.kind = 'pipeline'")
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"pipeline {exp_name}", tags={PIPELINE_TAG: pid, "kind": "pipeline"})
    return run.info.run_id


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for this stage execution, nested under the pipeline's parent run when DVC launched it.

    `params` is the stage's own params section; it is logged and its hash becomes the `params.hash` tag.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client, exp_id = open_experiment(uri)
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    pid = pipeline_id()
    tags = {
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
        "dvc.exp_name": exp_name,
        "git.commit": git_commit(),
        "params.hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12],
        "kind": "stage",
    }
    parent = None
    if pid:
        tags[PIPELINE_TAG] = pid
        parent = _pipeline_parent(client, exp_id, pid, exp_name)
    with mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags, parent_run_id=parent) as run:
        mlflow.log_params(flat(params))
        log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, uri)
        yield run
    if parent:
        client.set_terminated(parent)


def log_artifacts_to_parent(paths: list[str | Path], artifact_path: str | None = None) -> str | None:
    """Also attach files to the pipeline's parent run of the active stage run; its id, or None without a parent.

    The parent exists only when DVC launched the stage (see `stage_run`); by hand there is nothing to do.
    """
    run = mlflow.active_run()
    if run is None:
        return None
    client = MlflowClient(mlflow.get_tracking_uri())
    parent = client.get_run(run.info.run_id).data.tags.get("mlflow.parentRunId")
    if not parent:
        return None
    for path in paths:
        client.log_artifact(parent, str(path), artifact_path)
    return parent
