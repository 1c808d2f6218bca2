"""An MLflow server lost mid-stage costs seconds and a buffer file, never the training; `upload` repairs the run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from yolo_compress.config import DataConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.tracking import mlflow_buffer as buf

from .conftest import REPO, MlflowServer, free_port

EPOCHS = 4
TINY_TEACHER = {"model": "yolo11n.yaml", "epochs": EPOCHS, "imgsz": 64, "batch": 4, "close_mosaic": 0,
                "mosaic": 0.0, "workers": 0, "warmup_epochs": 0.0}
CURVE = Path("runs/train_teacher/train/curve.json")  # written at each epoch's end, just before its log call


def test_a_dead_server_costs_one_bounded_wait_then_upload_creates_the_lost_run(
        tmp_path: Path, isolated_mlflow: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    for key, value in buf.HTTP_BOUNDS.items():
        monkeypatch.setenv(key, value)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused, as after a crash
    session = buf.Session(MlflowClient(dead), dead, tmp_path / "buffer", "outage-test")
    session.add_run("run1", "train_teacher", "0", {"dvc.stage": "train_teacher"})
    art = tmp_path / "teacher.json"
    art.write_text('{"val": 1}\n')

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        session.call("run1", {"op": "metrics", "values": {"map50_95": 0.1}, "step": 1, "timestamp": buf.now_ms()})
        first = time.monotonic() - t0
        for step in (2, 3):
            session.call("run1", {"op": "metrics", "values": {"map50_95": 0.1 * step}, "step": step,
                                  "timestamp": buf.now_ms()})
        session.call("run1", {"op": "artifact", "src": str(art), "artifact_path": "metrics"})
        session.finish("run1", "FINISHED")
    assert first < 15, f"the first failed call took {first:.1f} s"
    assert time.monotonic() - t0 - first < 1, "later calls must go straight to the buffer"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "is unreachable (Connection refused)" in warnings[0], warnings
    art.write_text("changed after the stage\n")  # the buffer holds the file as logged

    line = session.missing()
    assert line and "\n" not in line and buf.UPLOAD_COMMAND in line
    assert "run run1 (train_teacher): 3 metric values (steps 1-3), 1 artifact, the end status FINISHED" in line

    out = buf.upload(tmp_path / "buffer", isolated_mlflow)  # a store that never had run1
    assert len(out) == 1 and "is not on the server: created run" in out[0], out
    client = MlflowClient(isolated_mlflow)
    (run,) = client.search_runs([client.get_experiment_by_name("outage-test").experiment_id])
    assert run.data.tags["yolo_compress.buffered_run_id"] == "run1" and run.info.run_name == "train_teacher"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "map50_95")] == [
        (1, 0.1), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert run.info.status == "FINISHED"
    local = client.download_artifacts(run.info.run_id, "metrics/teacher.json", str(tmp_path / "dl"))
    assert Path(local).read_text() == '{"val": 1}\n'
    assert not list((tmp_path / "buffer").iterdir())
    assert buf.upload(tmp_path / "buffer") == [f"nothing to upload: no buffered MLflow data in {tmp_path / 'buffer'}"]


def test_upload_to_a_dead_server_says_so_in_one_line_and_keeps_the_buffer(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in buf.HTTP_BOUNDS.items():
        monkeypatch.setenv(key, value)
    dead = f"http://127.0.0.1:{free_port()}"
    session = buf.Session(MlflowClient(dead), dead, tmp_path / "buffer", "outage-test")
    session.add_run("run1", "distill", "0", {})
    session.finish("run1", "FAILED")
    proc = subprocess.run([sys.executable, "-m", "yolo_compress.tracking", "upload", "--buffer-dir",
                           str(tmp_path / "buffer")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: MLflow server {dead} is unreachable (Connection refused); nothing more was uploaded and "
        f"{tmp_path / 'buffer'} still holds the rest: run `{buf.UPLOAD_COMMAND}` when it is up"]
    assert (tmp_path / "buffer" / "run1.jsonl").is_file()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A stage working dir: a tiny prepared dataset (64 px) and params for a 4-epoch yolo11n teacher."""
    ws = tmp_path / "ws"
    prepare_dataset(DataConfig(image_size=64, train_images=8, val_images=4, test_images=2, test_shift_images=2),
                    seed=0, root=ws / "data" / "prepared")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["teacher"].update(TINY_TEACHER)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


@pytest.mark.e2e
def test_server_killed_during_training_costs_no_output_and_upload_completes_the_run(
        workspace: Path, restartable_mlflow_server: MlflowServer) -> None:
    server = restartable_mlflow_server
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTEST_"))}
    env |= {"MLFLOW_TRACKING_URI": server.uri, "DVC_ROOT": str(workspace),
            "YOLO_CONFIG_DIR": str(workspace / ".ultralytics")}
    cmd = [sys.executable, str(REPO / "stages/train.py"), "--role", "teacher", "--data", "data/prepared",
           "--out", "models/teacher.pt", "--metrics", "metrics/teacher.json", "--plots", "plots/train_teacher.json"]
    log = (workspace / "stage.log").open("w")
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (workspace / CURVE).is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the stage ended or stalled before its first epoch:\n{(workspace / 'stage.log').read_text()}")
        time.sleep(0.1)
    server.stop()  # SIGKILL, right after epoch 1
    killed = time.monotonic()
    try:
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
        log.close()
    after_kill = time.monotonic() - killed
    out = (workspace / "stage.log").read_text()
    assert rc == 0, out[-3000:]

    # the outputs do not depend on MLflow
    curve = json.loads((workspace / "plots/train_teacher.json").read_text())
    assert [r["epoch"] for r in curve] == list(range(1, EPOCHS + 1))
    metrics = json.loads((workspace / "metrics/teacher.json").read_text())
    assert metrics["train"]["epochs"] == EPOCHS and (workspace / "models/teacher.pt").stat().st_size > 0
    # the outage cost one bounded wait: the epochs after the kill plus a few seconds, not minutes of retries
    trained_after_kill = sum(r["seconds"] for r in curve[1:])
    assert after_kill < trained_after_kill + 40, (after_kill, trained_after_kill)
    lines = out.splitlines()
    assert sum("is unreachable" in ln for ln in lines) == 1, out[-3000:]
    (missing,) = [ln for ln in lines if buf.UPLOAD_COMMAND in ln]
    run_id = metrics["mlflow_run_id"]
    assert f"run {run_id} (train_teacher):" in missing and "the end status FINISHED" in missing
    assert "Traceback" not in out and "Retrying" not in out

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # its end status waits in the buffer
    assert len(client.get_metric_history(run_id, "train_box_loss")) < EPOCHS
    up = subprocess.run([sys.executable, "-m", "yolo_compress.tracking", "upload"], cwd=workspace, env=env,
                        capture_output=True, text=True)
    assert up.returncode == 0, up.stderr[-3000:]
    assert f"run {run_id} (train_teacher): uploaded" in up.stdout, up.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_box_loss", "map50_95", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, EPOCHS + 1)), key
    assert run.data.metrics["best.map50_95"] == metrics["val"]["map50_95"]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"teacher.json", "plots"}
    assert not list((workspace / buf.BUFFER_DIR).glob("*.jsonl"))
