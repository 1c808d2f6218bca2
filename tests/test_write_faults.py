"""Write faults: one that exists before a stage starts costs no epoch; one that appears during training keeps the
trained weights, and a rerun with `resume: true` writes the outputs from them without training again."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from yolo_compress.config import DataConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.errors import UserError
from yolo_compress.files import check_outputs

from .tiny_pipeline import REPO

WEIGHTS = Path("runs/train_student/train/weights")
CMD = [sys.executable, str(REPO / "stages" / "train.py"), "--role", "student", "--data", "data/prepared", "--out",
       "models/student.pt", "--metrics", "metrics/student.json", "--plots", "plots/train_student.json"]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    prepare_dataset(DataConfig(image_size=64, train_images=8, val_images=4, test_images=2, test_shift_images=2),
                    seed=0, root=tmp_path / "data" / "prepared")
    write_params(tmp_path, resume=False)
    return tmp_path


def write_params(root: Path, resume: bool) -> None:
    student = {"model": "yolo11n.yaml", "epochs": 3, "imgsz": 64, "batch": 4, "close_mosaic": 0, "workers": 0}
    (root / "params.yaml").write_text(yaml.safe_dump({"resume": resume, "student": student}))


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Folders the test makes immutable (chattr +i); made mutable again afterwards, whatever happens."""
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def make_immutable(path: Path, made: list[Path]) -> None:
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i does not work here (not root, or a filesystem without the flag)")
    made.append(path)


@pytest.mark.parametrize("fault", ["immutable folder", "file in the way"])
def test_a_fault_that_exists_before_the_stage_costs_no_epoch(workspace: Path, immutable: list[Path],
                                                              fault: str) -> None:
    models = workspace / "models"
    if fault == "immutable folder":
        models.mkdir()
        make_immutable(models, immutable)
    else:
        models.write_text("not a folder\n")
    out = subprocess.run(CMD, cwd=workspace, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: models/student.pt: this output cannot be written ("), lines[-1]
    assert "Traceback" not in out.stderr
    assert not (workspace / WEIGHTS).exists()  # refused before the first epoch


def test_too_little_disk_room_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"MB free on its disk, and this stage needs about \d+ MB"):
        check_outputs([tmp_path / "model.pt"], room_bytes=shutil.disk_usage(tmp_path).free * 2)
    check_outputs([tmp_path / "model.pt"], room_bytes=1)
    assert list(tmp_path.iterdir()) == []  # the probes leave nothing behind


def test_a_fault_during_training_keeps_the_weights_and_resume_writes_them(workspace: Path) -> None:
    with (workspace / "err.txt").open("w") as err:
        proc = subprocess.Popen(CMD, cwd=workspace, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 240
        while not (workspace / WEIGHTS / "last.pt").is_file():  # the first epoch is saved: outputs were checked
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"train.py exited {proc.returncode} or stalled:\n{(workspace / 'err.txt').read_text()}")
            time.sleep(0.05)
        (workspace / "models").rmdir()  # the fault appears mid-training: a file where the output folder was
        (workspace / "models").write_text("in the way\n")
        code = proc.wait(timeout=240)
    stderr = (workspace / "err.txt").read_text()
    assert code == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: models/student.pt: could not write it (File exists); the trained weights are "
                           "kept in "), last
    kept = Path(last.split("kept in ")[1].split(": fix that")[0])
    assert kept.is_file() and "Traceback" not in stderr
    assert not (workspace / "metrics" / "student.json").exists()  # nothing half-written
    trained_at = kept.stat().st_mtime_ns

    (workspace / "models").unlink()
    write_params(workspace, resume=True)
    started = time.monotonic()
    rerun = subprocess.run(CMD, cwd=workspace, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert time.monotonic() - started < 60 and "not trained again" in rerun.stderr
    assert kept.stat().st_mtime_ns == trained_at  # the same weights, not a new run
    metrics = json.loads((workspace / "metrics" / "student.json").read_text())
    assert metrics["train"]["epochs"] == 3 and 0 <= metrics["val"]["map50_95"] <= 1
    assert len(json.loads((workspace / "plots" / "train_student.json").read_text())) == 3
    assert (workspace / "models" / "student.pt").is_file()
