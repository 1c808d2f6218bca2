"""A training stage killed midway under `dvc repro` (Ctrl-C or SIGKILL): nothing torn is left, and a rerun completes.

Both signals go to the whole process group, as a terminal's Ctrl-C or an OOM kill of the job would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from yolo_compress.models import YOLO

from .tiny_pipeline import copy_repo, run

pytestmark = pytest.mark.e2e

EPOCHS = 4
# Written after last.pt at the end of each epoch: once it exists, the first epoch is wholly saved.
CURVE = Path("runs/train_student/train/curve.json")


def kill_when_first_epoch_is_saved(root: Path, env: dict[str, str], sig: signal.Signals) -> None:
    proc = subprocess.Popen(["dvc", "repro", "train_student"], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (root / CURVE).is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"train_student ended (exit {proc.returncode}) or stalled before saving its first epoch")
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def assert_nothing_torn(root: Path) -> None:
    """Each output is either absent (DVC removes outs before a stage runs) or whole."""
    for rel in ("metrics/student.json", "plots/train_student.json"):
        if (root / rel).exists():
            json.loads((root / rel).read_text())
    if (root / "models/student.pt").exists():
        assert YOLO(str(root / "models/student.pt")).task == "detect"
    assert not list((root / "models").glob(".*.tmp")) and not list((root / "metrics").glob(".*.tmp"))


@pytest.mark.parametrize(("sig", "resume"), [(signal.SIGINT, True), (signal.SIGKILL, False)],
                         ids=["sigint-resume", "sigkill-restart"])
def test_killed_training_stage_leaves_no_torn_output_and_a_rerun_completes(
        tiny_repo: tuple[Path, dict[str, str]], tmp_path: Path, sig: signal.Signals, resume: bool) -> None:
    root, env = copy_repo(tiny_repo[0], tmp_path / "repo"), tiny_repo[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["student"]["epochs"] = EPOCHS
    params["resume"] = resume
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    kill_when_first_epoch_is_saved(root, env, sig)
    assert_nothing_torn(root)
    assert "train_student" in run(["dvc", "status", "train_student"], root, env).stdout

    out = run(["dvc", "repro", "train_student"], root, env)
    log = out.stdout + out.stderr
    metrics = json.loads((root / "metrics/student.json").read_text())
    curve = json.loads((root / "plots/train_student.json").read_text())
    assert [row["epoch"] for row in curve] == list(range(1, EPOCHS + 1))
    assert metrics["train"]["epochs"] == EPOCHS and 0 <= metrics["val"]["map50_95"] <= 1
    assert YOLO(str(root / "models/student.pt")).task == "detect"
    if resume:
        assert "resuming the interrupted run" in log
        assert 1 <= metrics["train"]["resumed_after_epoch"] < EPOCHS
    else:
        assert "restarting from scratch" in log
        assert metrics["train"]["resumed_after_epoch"] == 0
    assert "train_student" not in run(["dvc", "status", "train_student"], root, env).stdout
