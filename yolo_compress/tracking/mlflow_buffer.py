"""MLflow calls that never cost training: a dead server gets seconds, then the data waits in a local buffer.

A stage logs through one `Session`. While the server answers, each call goes straight to it. The first call that fails
for want of a server (refused, timed out, 5xx) switches the session offline with one warning line; from then on every
call of the stage goes to `.mlflow-buffer/<run_id>.jsonl` (artifacts copied beside it) without touching the network.
`upload` (`python -m yolo_compress.tracking upload`) replays a file through MLflow's client when the server is back.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from yolo_compress.errors import UserError

log = logging.getLogger(__name__)

BUFFER_DIR = ".mlflow-buffer"
UPLOAD_COMMAND = "python -m yolo_compress.tracking upload"
# MLflow's defaults (7 retries, exponential backoff) spent ~9 minutes on a killed server; these spend ~3 s on a refused
# connection and at most 3 x 10 s on a hung one, once per stage (the session then stops asking).
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Run tags naming the process that owns a run, so that a run it left RUNNING can be told from a live one.
HOST, PID, PID_START = "yolo_compress.host", "yolo_compress.pid", "yolo_compress.pid_start"
PARENT = "mlflow.parentRunId"


def now_ms() -> int:
    """Wall time in ms, as MLflow stamps metrics and runs."""
    return int(time.time() * 1000)


def is_outage(err: Exception) -> bool:
    """True when `err` says the store is out of reach (network, timeout, 5xx, 429), not that the call was wrong."""
    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500 or err.get_http_status_code() == 429
    return isinstance(err, requests.RequestException) or (
        isinstance(err, OSError) and not isinstance(err, FileNotFoundError))


def reason(err: BaseException) -> str:
    """A short cause for a one-line message: MLflow wraps a refused connection in a 400-character sentence."""
    text = str(err).strip()
    found = re.search(r"\[Errno -?\d+\] ([^'\"()]+)|(Read timed out)|(\d{3} error response)", text)
    if found:
        return next(g for g in found.groups() if g).strip()
    return text.splitlines()[0][:120] if text else type(err).__name__


def owner_tags(proc: psutil.Process | None = None) -> dict[str, str]:
    """Tags naming `proc` (default: this process) as a run's owner."""
    proc = proc or psutil.Process()
    return {HOST: socket.gethostname(), PID: str(proc.pid), PID_START: f"{proc.create_time():.3f}"}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process named by `owner_tags` still runs; None when it cannot be told here (other host, no tags)."""
    if tags.get(HOST) != socket.gethostname() or not tags.get(PID, "").isdigit():
        return None
    try:
        started = psutil.Process(int(tags[PID])).create_time()
    except psutil.Error:
        return False
    try:
        return abs(started - float(tags.get(PID_START, ""))) < 1.0  # else the pid was reused by another process
    except ValueError:
        return None


def send(client: MlflowClient, run_id: str, rec: dict[str, Any], root: Path | None = None) -> None:
    """Make the MLflow call that `rec` describes; a buffered artifact's copy lies under `root`."""
    op = rec["op"]
    if op == "metrics":
        ts, step = rec["timestamp"], rec["step"]
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in rec["values"].items()])
    elif op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in rec["values"].items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["values"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, str(root / rec["file"]) if root else rec["src"], rec["artifact_path"])
    elif op == "status":
        client.set_terminated(run_id, rec["status"], rec["end_time"])
    else:
        raise ValueError(f"unknown buffered MLflow call {op!r}")


def describe(recs: list[dict[str, Any]]) -> str:
    """What these records carry, for a person: '12 metric values (steps 2-4), 3 artifacts, the end status FINISHED'."""
    parts = []
    values = [(r["step"], len(r["values"])) for r in recs if r["op"] == "metrics"]
    if values:
        steps = sorted({s for s, _ in values})
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        parts.append(f"{sum(n for _, n in values)} metric values ({span})")
    for op, noun in (("params", "param"), ("tags", "tag")):
        n = sum(len(r["values"]) for r in recs if r["op"] == op)
        if n:
            parts.append(f"{n} {noun}{'s' * (n > 1)}")
    n = sum(r["op"] == "artifact" for r in recs)
    if n:
        parts.append(f"{n} artifact{'s' * (n > 1)}")
    parts += [f"the end status {r['status']}" for r in recs if r["op"] == "status"][-1:]
    return ", ".join(parts) or "no data"


@dataclass
class _Run:
    header: dict[str, Any]  # what `upload` needs to find the run again, or to create it anew
    sent: list[dict[str, Any]] = field(default_factory=list)  # kept to rebuild the run if the server loses it
    unsent: list[dict[str, Any]] = field(default_factory=list)


class Session:
    """The MLflow side of one stage process: its runs, whether the server answers, and the buffer."""

    def __init__(self, client: MlflowClient, uri: str, buffer_dir: Path, experiment_name: str) -> None:
        self.client, self.uri, self.dir, self.experiment_name = client, uri, buffer_dir, experiment_name
        self.offline: str | None = None  # why the server was given up on
        self.runs: dict[str, _Run] = {}
        self.stack: list[str] = []  # the run that log calls go to is the last

    def add_run(self, run_id: str, name: str, experiment_id: str, tags: dict[str, str], offline: bool = False) -> None:
        """Track a run of this stage (created by the caller, or by `start_child`)."""
        self.runs[run_id] = _Run({"op": "run", "run_id": run_id, "uri": self.uri, "run_name": name,
                                  "experiment_id": experiment_id, "experiment_name": self.experiment_name,
                                  "tags": tags, "start_time": now_ms(), "offline": offline})

    def _reach(self, call: Callable[[], Any]) -> tuple[bool, Any]:
        """(True, call()) while the server answers; (False, None) once it is out of reach: offline for good."""
        if self.offline is not None:
            return False, None
        retries = logging.getLogger("urllib3.connectionpool")  # it warns once per retry: not what a user needs
        level = retries.level
        retries.setLevel(logging.ERROR)
        try:
            return True, call()
        except Exception as err:
            if not is_outage(err):
                raise
            self.offline = reason(err)
            log.warning("MLflow server %s is unreachable (%s): this stage's MLflow data now goes to %s/, "
                        "training goes on", self.uri, self.offline, self.dir)
            return False, None
        finally:
            retries.setLevel(level)

    def call(self, run_id: str, rec: dict[str, Any]) -> None:
        """Send one record to the server, or buffer it; a call the server refuses is dropped with a warning."""
        try:
            sent, _ = self._reach(lambda: send(self.client, run_id, rec))
        except Exception as err:  # noqa: BLE001 - no log call may stop a stage: say what was lost, go on
            log.warning("MLflow refused %s for run %s (%s): not logged", rec["op"], run_id, reason(err))
            return
        run = self.runs[run_id]
        if sent:
            # an artifact that reached the server is not kept: only its name, for a rebuilt run's message
            run.sent.append({"op": "artifact", "name": Path(rec["src"]).name, "artifact_path": rec["artifact_path"]}
                            if rec["op"] == "artifact" else rec)
            return
        if rec["op"] == "artifact":
            rel = Path(run_id, str(len(run.unsent)), Path(rec["src"]).name)
            (self.dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(rec["src"], self.dir / rel)  # the stage may overwrite the file before the upload
            rec = {"op": "artifact", "file": str(rel), "artifact_path": rec["artifact_path"]}
        run.unsent.append(rec)
        self._append(run_id, [{**rec, "sent": False}])

    def _append(self, run_id: str, recs: list[dict[str, Any]]) -> None:
        path, run = self.dir / f"{run_id}.jsonl", self.runs[run_id]
        if not path.exists():  # its first line: the header and whatever reached the server before
            recs = [run.header, *({**r, "sent": True} for r in run.sent), *recs]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # appends: a kill leaves at most a torn last line, which `upload` skips
            f.write("".join(json.dumps(r) + "\n" for r in recs))

    def start_child(self, name: str, tags: dict[str, str]) -> str:
        """A run nested under the current one; created offline (a local id, uploaded later) if the server is away."""
        parent = self.stack[-1]
        exp_id = self.runs[parent].header["experiment_id"]
        tags = {**tags, PARENT: parent}
        created, run = self._reach(lambda: self.client.create_run(exp_id, tags=tags, run_name=name))
        run_id = run.info.run_id if created else f"offline-{uuid.uuid4().hex}"
        self.add_run(run_id, name, exp_id, tags, offline=not created)
        if not created:
            self._append(run_id, [])
        return run_id

    def finish(self, run_id: str, status: str) -> None:
        """Set the run's end status (FINISHED, FAILED, KILLED), now or at upload."""
        self.call(run_id, {"op": "status", "status": status, "end_time": now_ms()})

    def missing(self) -> str | None:
        """One line on what the server lacks and how to send it; None when everything arrived."""
        parts = [f"run {run_id} ({run.header['run_name']}): "
                 f"{'the run itself, ' * run.header['offline']}{describe(run.unsent)}"
                 for run_id, run in self.runs.items() if run.unsent or run.header["offline"]]
        if not parts:
            return None
        return (f"MLflow server {self.uri} lacks {'; '.join(parts)}. The outputs are complete; the MLflow data is kept "
                f"in {self.dir}/. Upload it when the server is back: {UPLOAD_COMMAND}")


def read_buffer(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and records of one buffer file; a torn last line (a kill mid-append) is skipped."""
    lines = path.read_text().splitlines()
    recs = []
    for i, line in enumerate(lines, 1):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines):
                raise UserError(f"{path}:{i}: not valid JSON; this buffered MLflow data cannot be replayed, "
                                "move the file away to upload the others") from None
            log.warning("%s:%d: torn last line (the stage was killed while writing it), skipped", path, i)
    if not recs or recs[0].get("op") != "run":
        raise UserError(f"{path}: no run header on line 1; move the file away to upload the others")
    return recs[0], recs[1:]


def _exists(client: MlflowClient, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _create(client: MlflowClient, header: dict[str, Any], renamed: dict[str, str]) -> tuple[str, str]:
    """A new run carrying the header's name, tags and start time; its id and a note on its parent."""
    exp = client.get_experiment_by_name(header["experiment_name"])
    exp_id = exp.experiment_id if exp else client.create_experiment(header["experiment_name"])
    tags = {**header["tags"], "yolo_compress.buffered_run_id": header["run_id"]}
    note = ""
    if PARENT in tags:
        tags[PARENT] = renamed.get(tags[PARENT], tags[PARENT])
        if not _exists(client, tags[PARENT]):
            note = f", without its parent run {tags.pop(PARENT)} (not on the server)"
    run = client.create_run(exp_id, start_time=header["start_time"], tags=tags, run_name=header["run_name"])
    return run.info.run_id, note


def _replay(client: MlflowClient, run_id: str, recs: list[dict[str, Any]], root: Path) -> None:
    # One batch per kind (MLflow splits big ones itself); the end status last: FINISHED means complete.
    merged: dict[str, dict[str, Any]] = {"params": {}, "tags": {}}
    for r in recs:
        if r["op"] in merged:
            merged[r["op"]].update(r["values"])
    for op, values in merged.items():
        if values:
            send(client, run_id, {"op": op, "values": values})
    metrics = [Metric(k, v, r["timestamp"], r["step"])
               for r in recs if r["op"] == "metrics" for k, v in r["values"].items()]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    for r in recs:
        if r["op"] == "artifact" and "file" in r:
            send(client, run_id, r, root)
    for r in [r for r in recs if r["op"] == "status"][-1:]:
        send(client, run_id, r)


def _upload_file(path: Path, uri: str | None, renamed: dict[str, str]) -> str:
    header, recs = read_buffer(path)
    run_id, name, uri = header["run_id"], header["run_name"], uri or header["uri"]
    client = MlflowClient(uri)
    target = next((r["run_id"] for r in recs if r["op"] == "uploaded_as"), None)  # a rerun after a partial upload
    recs = [r for r in recs if r["op"] != "uploaded_as"]
    if target is None and not header["offline"] and _exists(client, run_id):
        todo, done = [r for r in recs if not r["sent"]], f"run {run_id} ({name}): uploaded "
    else:
        note = ""
        if target is None:  # the server lost the run (a new store), or the run was created while it was away
            target, note = _create(client, header, renamed)
            with path.open("a") as f:
                f.write(json.dumps({"op": "uploaded_as", "run_id": target}) + "\n")
        why = "was created while the server was away" if header["offline"] else "is not on the server"
        lost = sum(r["op"] == "artifact" and "file" not in r for r in recs)
        lost_note = f" ({lost} artifacts that reached the old run are not in it)" if lost else ""
        todo = [r for r in recs if not (r["op"] == "artifact" and "file" not in r)]
        done = f"run {run_id} ({name}) {why}: created run {target}{note}{lost_note}; uploaded "
    renamed[run_id] = target or run_id
    _replay(client, renamed[run_id], todo, path.parent)
    return f"{done}{describe(todo)} to {uri}"


def upload(buffer_dir: Path, uri: str | None = None) -> list[str]:
    """Replay every buffered run into the server it was logged to (or `uri`); one line per run.

    A run the server still has gets the records it lacks under the same id; one it lacks is created anew with all the
    records (its new id is noted in the file, so a rerun after a failure does not create it twice). A file is removed
    once its run is complete on the server; runs whose stage still runs are left for later.
    """
    paths = sorted(buffer_dir.glob("*.jsonl")) if buffer_dir.is_dir() else []
    if not paths:
        return [f"nothing to upload: no buffered MLflow data in {buffer_dir}"]
    headers = {p: read_buffer(p)[0] for p in paths}
    out, renamed = [], {}
    for path in sorted(paths, key=lambda p: (headers[p]["offline"], headers[p]["start_time"])):  # parents first
        header = headers[path]
        if owner_alive(header["tags"]):
            out.append(f"run {header['run_id']} ({header['run_name']}): its stage still runs (pid "
                       f"{header['tags'][PID]}); upload again after it ends")
            continue
        try:
            out.append(_upload_file(path, uri, renamed))
        except Exception as err:
            if not is_outage(err):
                raise
            raise UserError(f"MLflow server {uri or header['uri']} is unreachable ({reason(err)}); nothing more was "
                            f"uploaded and {buffer_dir} still holds the rest: run `{UPLOAD_COMMAND}` when it is up"
                            ) from None
        path.unlink()
        shutil.rmtree(buffer_dir / header["run_id"], ignore_errors=True)
    return out
