"""MLflow for stages: where the store is, one run per stage execution, a parent run per pipeline invocation.

Stages log through `log_metrics`, `log_epoch`, `log_params`, `set_tag`, `log_artifact` and `child_run` here: an
MLflow outage then costs seconds and a buffer file, never the training (see yolo_compress.tracking.mlflow_buffer).
`python -m yolo_compress.tracking upload` sends buffered data once the server is back.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import psutil
import requests
from filelock import FileLock
from mlflow.tracking import MlflowClient

from yolo_compress.errors import UserError, interrupt_handler
from yolo_compress.tracking import mlflow_buffer as buf

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
            f"MLflow server {uri} is unreachable ({type(err).__name__}); start it (docs/team.md) "
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


def dvc_invoker() -> psutil.Process | None:
    """The `dvc repro` / `dvc exp run` process that launched this stage, or None when DVC did not (run by hand)."""
    stage = os.environ.get("DVC_STAGE")  # DVC sets it for every stage command
    if stage is None:
        return None
    try:
        # DVC gives no invocation id: the nearest ancestor without our DVC_STAGE is dvc (its `$SHELL -c` child has it)
        return next((p for p in psutil.Process().parents() if p.environ().get("DVC_STAGE") != stage), None)
    except psutil.Error:
        return None


def pipeline_id() -> str | None:
    """Identity of the DVC invocation that launched this stage, or None when run by hand: the dvc process (pid and
    start time) on this host, with DVC's repo root and experiment name."""
    proc = dvc_invoker()
    if proc is None:
        return None
    key = (f"{socket.gethostname()}:{proc.pid}:{proc.create_time()}:{os.environ.get('DVC_ROOT')}:"
           f"{os.environ.get('DVC_EXP_NAME')}")
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _pipeline_parent(client: MlflowClient, exp_id: str, tags: dict[str, str]) -> str:
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{tags[PIPELINE_TAG]}' and tags.kind = 'pipeline'")
    if found:
        return found[0].info.run_id
    return client.create_run(exp_id, run_name=f"pipeline {tags['dvc.exp_name']}", tags=tags).info.run_id


def reap_dead_runs(client: MlflowClient, exp_id: str, stage: str, buffer_dir: Path) -> list[str]:
    """Mark KILLED this stage's runs on this host left RUNNING by a process that is gone (SIGKILL, OOM, power).

    Their RUNNING nested runs and pipeline parent (whose `dvc` process is gone too) go with them. A run whose end
    status waits in the buffer for `upload` is left alone. One line per run marked.
    """
    dead = f"attributes.status = 'RUNNING' and tags.`{buf.HOST}` = '{socket.gethostname()}'"
    lines = []
    for run in client.search_runs([exp_id], filter_string=f"{dead} and tags.`dvc.stage` = '{stage}'"):
        run_id, tags = run.info.run_id, run.data.tags
        if buf.owner_alive(tags) is not False or (buffer_dir / f"{run_id}.jsonl").exists():
            continue
        kids = client.search_runs([exp_id], filter_string=f"{dead} and tags.`{buf.PARENT}` = '{run_id}'")
        marked = [run_id, *(k.info.run_id for k in kids if buf.owner_alive(k.data.tags) is False)]
        parent = client.get_run(tags[buf.PARENT]) if tags.get(buf.PARENT) else None
        if parent and parent.info.status == "RUNNING" and buf.owner_alive(parent.data.tags) is False:
            marked.append(parent.info.run_id)
        for rid in marked:
            client.set_terminated(rid, "KILLED")
        lines.append(f"MLflow run {run_id} ({stage}) was left RUNNING by pid {tags[buf.PID]}, which is gone: marked "
                     f"KILLED{f' with {len(marked) - 1} nested/parent run(s)' if len(marked) > 1 else ''}")
    return lines


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _end_status(err: BaseException | None) -> str:
    if err is None or (isinstance(err, SystemExit) and not err.code):
        return "FINISHED"
    return "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"  # errors.Terminated (SIGTERM) is one too


def _end_fluent_run(run_id: str, status: str) -> None:
    # The end status already went through the session (or its buffer). MLflow pops its active run before it calls the
    # server, so with the server gone one quick, failed call still leaves no active run behind.
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        with contextlib.suppress(Exception):
            mlflow.end_run(status)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


_session: buf.Session | None = None  # the stage run of this process, for the log calls below


@contextmanager
def stage_run(stage: str, params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for this stage execution, nested under the pipeline's parent run when DVC launched it.

    `params` is the stage's own params section; it is logged and its hash becomes the `params.hash` tag. The run ends
    FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM; after SIGKILL the next start of the stage marks it).
    A server lost mid-stage costs one warning, and one line at the end on what to upload.
    """
    for key, value in buf.HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)  # read per request; a user's own setting wins
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one warning per retry otherwise
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client, exp_id = open_experiment(uri)
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    stage_tag = os.environ.get("DVC_STAGE", stage)
    buffer_dir = repo_root() / buf.BUFFER_DIR
    for line in reap_dead_runs(client, exp_id, stage_tag, buffer_dir):
        log.info("%s", line)
    pid = pipeline_id()
    tags = {
        "dvc.stage": stage_tag,
        "dvc.exp_name": exp_name,
        "git.commit": git_commit(),
        "params.hash": hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12],
        "kind": "stage",
        **buf.owner_tags(),
    }
    session = buf.Session(client, uri, buffer_dir, os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
    parent = None
    if pid:
        tags[PIPELINE_TAG] = pid
        dvc = dvc_invoker()  # the parent run's owner: pid and start time in its tags, for reap_dead_runs
        parent_tags = {PIPELINE_TAG: pid, "kind": "pipeline", "dvc.exp_name": exp_name,
                       **(buf.owner_tags(dvc) if dvc else {})}
        parent = _pipeline_parent(client, exp_id, parent_tags)
        session.add_run(parent, f"pipeline {exp_name}", exp_id, parent_tags)
    run = mlflow.start_run(experiment_id=exp_id, run_name=stage, tags=tags, parent_run_id=parent)
    run_id = run.info.run_id
    session.add_run(run_id, stage, exp_id, {**tags, buf.PARENT: parent} if parent else tags)
    session.stack.append(run_id)
    global _session
    outer, _session = _session, session
    # SIGTERM arrives as errors.Terminated (installed by errors.stage_entrypoint, which every stage runs under)
    installed, err = None, None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL, None):
        installed = signal.signal(signal.SIGTERM, interrupt_handler(os.getpid()))
    try:
        log_params(flat(params))
        log.info("MLflow run %s (%s) in %s", run_id, stage, uri)
        yield run
    except BaseException as exc:
        err = exc
        raise
    finally:
        if installed is not None:
            signal.signal(signal.SIGTERM, installed)
        status = _end_status(err)
        session.finish(run_id, status)
        if parent:
            session.finish(parent, status)
        _end_fluent_run(run_id, status)
        _session = outer
        missing = session.missing()
        if missing:
            log.warning("%s", missing)


@contextmanager
def child_run(name: str) -> Iterator[str]:
    """A run nested under the current one of `stage_run` (e.g. one prune round); log calls inside go to it.

    It ends FINISHED, FAILED or KILLED like the stage's run. Yields its id (a local one if the server is away).
    """
    session = _active_session()
    run_id = session.start_child(name, buf.owner_tags())
    session.stack.append(run_id)
    err = None
    try:
        yield run_id
    except BaseException as exc:
        err = exc
        raise
    finally:
        session.stack.pop()
        session.finish(run_id, _end_status(err))


def _active_session() -> buf.Session:
    if _session is None:
        raise RuntimeError("MLflow logging outside tracking.stage_run")
    return _session


def log_metrics(values: dict[str, float], step: int | None = None) -> None:
    """Log metrics to the current run; buffered while its server is away."""
    session = _active_session()
    session.call(session.stack[-1], {"op": "metrics", "values": {k: float(v) for k, v in values.items()},
                                     "step": step or 0, "timestamp": buf.now_ms()})


def log_epoch(row: dict[str, float]) -> None:
    """One training curve row (see training.train_model's `on_epoch`), at step `epoch`."""
    log_metrics(row, step=int(row["epoch"]))


def log_params(values: dict[str, Any]) -> None:
    """Log params to the current run; buffered while its server is away."""
    session = _active_session()
    session.call(session.stack[-1], {"op": "params", "values": {k: str(v) for k, v in values.items()}})


def set_tags(values: dict[str, Any]) -> None:
    """Set tags on the current run; buffered while its server is away."""
    session = _active_session()
    session.call(session.stack[-1], {"op": "tags", "values": {k: str(v) for k, v in values.items()}})


def set_tag(key: str, value: Any) -> None:
    """Set one tag on the current run."""
    set_tags({key: value})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Attach a file to the current run; copied into the buffer while its server is away."""
    session = _active_session()
    session.call(session.stack[-1], {"op": "artifact", "src": str(path), "artifact_path": artifact_path})


def log_artifacts_to_parent(paths: list[str | Path], artifact_path: str | None = None) -> str | None:
    """Also attach files to the pipeline's parent run of the active stage run; its id, or None without a parent.

    The parent exists only when DVC launched the stage (see `stage_run`); by hand there is nothing to do.
    """
    if _session is not None:
        parent = _session.runs[_session.stack[0]].header["tags"].get(buf.PARENT)
        for path in paths if parent else []:
            _session.call(parent, {"op": "artifact", "src": str(path), "artifact_path": artifact_path})
        return parent
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


def main(argv: list[str] | None = None) -> None:
    """`python -m yolo_compress.tracking upload`: send MLflow data buffered during a server outage."""
    ap = argparse.ArgumentParser(prog="python -m yolo_compress.tracking", description=main.__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="replay .mlflow-buffer/ into the MLflow server(s) the stages logged to")
    up.add_argument("--buffer-dir", type=Path, help=f"default: <repo>/{buf.BUFFER_DIR}")
    up.add_argument("--tracking-uri", help="send to this store instead of the one each run was logged to")
    args = ap.parse_args(argv)
    for key, value in buf.HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    for line in buf.upload(args.buffer_dir or repo_root() / buf.BUFFER_DIR, args.tracking_uri):
        print(line)

