"""A training stage killed midway (Ctrl-C, SIGTERM, SIGKILL): one line says so, nothing is torn, a rerun completes.

Signals go to the whole process group, as a terminal's Ctrl-C or an OOM kill of the job would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from yolo_compress.config import DataConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.models import YOLO

from .tiny_pipeline import REPO, copy_repo, run

EPOCHS = 4
# Written after last.pt at the end of each epoch: once it exists, the first epoch is wholly saved.
CURVE = Path("runs/train_student/train/curve.json")
RUN_KEY = CURVE.with_name("run_key.txt")  # written just before the trainer starts


def signal_stage_when(root: Path, ready: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Run the train_student stage script in `root` (workers 2), send `sig` to its process group once `ready`
    exists, and return what it did (stdout, stderr, exit code)."""
    env = {**os.environ, "DVC_STAGE": "train_student"}
    cmd = [sys.executable, str(REPO / "stages" / "train.py"), "--role", "student", "--data", "data/prepared",
           "--out", "models/student.pt", "--metrics", "metrics/student.json", "--plots", "plots/train_student.json"]
    with (root / "out.txt").open("w") as out, (root / "err.txt").open("w") as err:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=err, start_new_session=True)
        deadline = time.monotonic() + 180
        while not (root / ready).is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"train.py exited {proc.returncode} or stalled before {ready}:\n"
                            f"{(root / 'err.txt').read_text()[-3000:]}")
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        try:
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, code, (root / "out.txt").read_text(), (root / "err.txt").read_text())


@pytest.mark.parametrize(("sig", "ready", "rerun"), [
    (signal.SIGINT, CURVE, r"rerun with resume: true to continue from epoch (\d+)"),
    (signal.SIGTERM, RUN_KEY, r"rerun to start it again"),
], ids=["ctrl-c-after-an-epoch", "sigterm-before-any-epoch"])
def test_an_interrupted_stage_says_so_in_one_line(tmp_path: Path, sig: signal.Signals, ready: Path,
                                                  rerun: str) -> None:
    """Exit 130 for Ctrl-C, 143 for SIGTERM (what a shell reports), and no traceback: not even the data-loader
    workers', which get the signal too."""
    prepare_dataset(DataConfig(image_size=64, train_images=8, val_images=4, test_images=2, test_shift_images=2),
                    seed=0, root=tmp_path / "data" / "prepared")
    student = {"model": "yolo11n.yaml", "epochs": 50, "imgsz": 64, "batch": 4, "close_mosaic": 0, "workers": 2}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"student": student}))

    done = signal_stage_when(tmp_path, ready, sig)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 128 + sig, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr[-3000:]
    found = re.fullmatch(f"interrupted; outputs of train_student were not written; {rerun}", lines[-1])
    assert found, lines[-1]
    if found.groups():  # the epoch it names is the one a resumed rerun would really start with
        curve = json.loads((tmp_path / CURVE).read_text())
        assert int(found.group(1)) == curve[-1]["epoch"] + 1 >= 2
    assert not any((tmp_path / rel).exists() for rel in ("models/student.pt", "metrics/student.json"))


SWALLOWED_SIGNAL_STAGE = """
import os, signal, sys
from yolo_compress import files
from yolo_compress.errors import stage_entrypoint

class SignalledWhileCollected:
    def __del__(self):  # Python drops what a __del__ raises ("Exception ignored in"), so the handler's exception too
        os.kill(os.getpid(), signal.{sig})
        for _ in range(10 ** 6):  # the handler runs between bytecodes, still inside __del__
            pass

@stage_entrypoint
def main():
    SignalledWhileCollected()
    files.write_text(sys.argv[1], "written after the signal")
    with files.atomic_dir(sys.argv[2]) as tmp:
        (tmp / "a.txt").write_text("written after the signal")

main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_whose_exception_python_swallows_still_stops_the_stage_before_it_writes(
        tmp_path: Path, sig: signal.Signals) -> None:
    """The CI failure this guards against: SIGTERM landed in importlib's module-lock weakref callback, its exception
    was dropped, and train_student wrote models/student.pt and exited 0."""
    script = SWALLOWED_SIGNAL_STAGE.format(sig=sig.name)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.txt"), str(tmp_path / "outdir")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "DVC_STAGE": "s"})
    assert "Exception ignored in" in done.stderr, done.stderr  # the swallowing really happened
    assert done.returncode == 128 + sig, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted; outputs of s were not written; rerun to start it again"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def kill_when_first_epoch_is_saved(root: Path, env: dict[str, str], sig: signal.Signals) -> str:
    """What `dvc repro train_student` wrote to stderr before `sig` (to its process group) ended it."""
    with (root.parent / "repro_stderr.txt").open("w+") as err:
        proc = subprocess.Popen(["dvc", "repro", "train_student"], cwd=root, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
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
        err.seek(0)
        return err.read()


def assert_nothing_torn(root: Path) -> None:
    """Each output is either absent (DVC removes outs before a stage runs) or whole."""
    for rel in ("metrics/student.json", "plots/train_student.json"):
        if (root / rel).exists():
            json.loads((root / rel).read_text())
    if (root / "models/student.pt").exists():
        assert YOLO(str(root / "models/student.pt")).task == "detect"
    assert not list((root / "models").glob(".*.tmp")) and not list((root / "metrics").glob(".*.tmp"))


@pytest.mark.e2e
@pytest.mark.parametrize(("sig", "resume"), [(signal.SIGINT, True), (signal.SIGKILL, False)],
                         ids=["sigint-resume", "sigkill-restart"])
def test_killed_training_stage_leaves_no_torn_output_and_a_rerun_completes(
        tiny_repo: tuple[Path, dict[str, str]], tmp_path: Path, sig: signal.Signals, resume: bool) -> None:
    root, env = copy_repo(tiny_repo[0], tmp_path / "repo"), tiny_repo[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["student"]["epochs"] = EPOCHS
    params["resume"] = resume
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    stderr = kill_when_first_epoch_is_saved(root, env, sig)
    if sig == signal.SIGINT:  # the stage's one line reaches the terminal through DVC
        assert re.search(r"^interrupted; outputs of train_student were not written; rerun with resume: true to "
                         r"continue from epoch \d+$", stderr, re.MULTILINE), stderr[-3000:]
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
