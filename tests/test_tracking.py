from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from yolo_compress.errors import UserError
from yolo_compress.tracking import mlflow_buffer as buf
from yolo_compress.tracking import runs as tracking


def test_default_store_is_sqlite_at_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking.tracking_uri() == f"sqlite:///{(tmp_path / 'repo').resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_stage_run_logs_params_and_tags(monkeypatch: pytest.MonkeyPatch, isolated_mlflow: str) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    with tracking.stage_run("train_student", {"epochs": 3, "model": "yolo11n.yaml"}) as run:
        mlflow.log_metric("map50_95", 0.5)
    got = MlflowClient(isolated_mlflow).get_run(run.info.run_id)
    assert got.data.params == {"epochs": "3", "model": "yolo11n.yaml"}
    assert got.data.tags["dvc.stage"] == "train_student"
    assert got.data.tags["dvc.exp_name"] == "exp-abc"
    assert len(got.data.tags["params.hash"]) == 12
    assert got.data.tags["git.commit"]
    assert got.info.status == "FINISHED"
    assert Path(got.info.artifact_uri.removeprefix("file://")).parent.parent.name == "mlartifacts"


def test_stage_runs_of_one_dvc_invocation_share_a_parent(monkeypatch: pytest.MonkeyPatch, isolated_mlflow: str) -> None:
    monkeypatch.setattr(tracking, "pipeline_id", lambda: "pipe123")
    with tracking.stage_run("prepare", {"a": 1}) as first:
        pass
    with tracking.stage_run("train_teacher", {"b": 2}) as second:
        pass
    client = MlflowClient(isolated_mlflow)
    parents = {client.get_run(r.info.run_id).data.tags["mlflow.parentRunId"] for r in (first, second)}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags[tracking.PIPELINE_TAG] == "pipe123"
    assert parent.info.status == "FINISHED"


def test_unreachable_server_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"MLflow server http://127.0.0.1:9 is unreachable") as err:
        with tracking.stage_run("prepare", {}):
            pytest.fail("the stage body must not run")
    assert "\n" not in str(err.value)
    assert time.monotonic() - start < 10


def test_pipeline_id_is_none_outside_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # set by hand (tests, queued runs' helpers): not a DVC stage
    assert tracking.pipeline_id() is None


PROBE = ("import json, os, sys; from yolo_compress.tracking import runs as tracking; "
         "json.dump([tracking.pipeline_id(), tracking.dvc_invoker().pid], open(sys.argv[1] + '.json', 'w'))")


def test_stages_of_one_dvc_invocation_share_its_id_and_know_its_pid(tmp_path: Path) -> None:
    """Real `dvc repro` under /bin/sh, which runs the stage command as its child instead of replacing itself."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "probe.py").write_text(PROBE)
    (repo / "dvc.yaml").write_text("stages:\n  a:\n    cmd: python probe.py a\n    outs: [a.json]\n"
                                   "  b:\n    cmd: python probe.py b\n    deps: [a.json]\n    outs: [b.json]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", SHELL="/bin/sh")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    seen = []
    for _ in range(2):
        dvc = subprocess.Popen(["dvc", "repro", "--force"], cwd=repo, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        out = dvc.communicate(timeout=300)[0]
        assert dvc.returncode == 0, out[-2000:]
        ids = {json.loads((repo / f"{s}.json").read_text())[0] for s in "ab"}
        pids = {json.loads((repo / f"{s}.json").read_text())[1] for s in "ab"}
        assert len(ids) == 1 and pids == {dvc.pid}, (ids, pids, dvc.pid)
        seen.append(ids.pop())
    assert seen[0] != seen[1]  # another invocation, another parent run


def test_parallel_first_use_of_a_fresh_sqlite_store_is_safe(tmp_path: Path) -> None:
    # Six processes creating one fresh SQLite store at once corrupted it before the file lock.
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = "import sys; from yolo_compress.tracking.runs import open_experiment; print(open_experiment(sys.argv[1])[1])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(6)]
    outs = [(p.communicate(timeout=300), p.returncode) for p in procs]
    assert [rc for _, rc in outs] == [0] * 6, [err[-500:] for (_, err), _ in outs]
    assert len({out.strip() for (out, _), _ in outs}) == 1  # one experiment, seen by all


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_left_running_by_a_gone_process_are_marked_killed_at_the_next_start(isolated_mlflow: str,
                                                                                 tmp_path: Path) -> None:
    client, exp = tracking.open_experiment(isolated_mlflow)
    gone = {buf.HOST: socket.gethostname(), buf.PID: str(_dead_pid()), buf.PID_START: "1.0"}
    mine = buf.owner_tags()  # a live owner: this test process

    def running(stage: str, owner: dict[str, str], **tags: str) -> str:
        return client.create_run(exp, tags={"dvc.stage": stage, **owner, **tags}).info.run_id

    pipeline = client.create_run(exp, tags={"kind": "pipeline", **gone}).info.run_id
    sigkilled = running("train_teacher", gone, **{buf.PARENT: pipeline})
    its_round = running("train_teacher", gone, **{buf.PARENT: sigkilled})
    live = running("train_teacher", mine)
    other_stage = running("train_student", gone)
    buffered = running("train_teacher", gone)
    (tmp_path / buf.BUFFER_DIR).mkdir()
    (tmp_path / buf.BUFFER_DIR / f"{buffered}.jsonl").write_text("")  # its end status waits for `upload`

    with tracking.stage_run("train_teacher", {}):
        pass
    status = {r: client.get_run(r).info.status for r in (sigkilled, its_round, pipeline, live, other_stage, buffered)}
    assert status == {sigkilled: "KILLED", its_round: "KILLED", pipeline: "KILLED", live: "RUNNING",
                      other_stage: "RUNNING", buffered: "RUNNING"}


@pytest.mark.parametrize(("error", "status"), [(ValueError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_stage_that_fails_or_is_interrupted_ends_its_runs_so(isolated_mlflow: str, error: type[BaseException],
                                                               status: str) -> None:
    with pytest.raises(error), tracking.stage_run("prune", {}) as run, tracking.child_run("round 1") as child:
        raise error
    client = MlflowClient(isolated_mlflow)
    assert client.get_run(run.info.run_id).info.status == status
    assert client.get_run(child).info.status == status
    assert client.get_run(child).data.tags[buf.PARENT] == run.info.run_id
    assert mlflow.active_run() is None


def test_sigterm_marks_the_run_killed_and_exits_143(isolated_mlflow: str, tmp_path: Path) -> None:
    code = ("import time; from yolo_compress.tracking import runs as tracking\n"
            "from yolo_compress.errors import stage_entrypoint\n"
            "@stage_entrypoint\n"
            "def main():\n"
            "    with tracking.stage_run('train_student', {}) as run:\n"
            "        print(run.info.run_id, flush=True); time.sleep(120)\n"
            "main()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": isolated_mlflow, "DVC_ROOT": str(tmp_path)})
    run_id = proc.stdout.readline().strip()
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "interrupted; outputs of -c were not written" in err
    assert MlflowClient(isolated_mlflow).get_run(run_id).info.status == "KILLED"
