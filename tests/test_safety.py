"""Checkpoints load with torch's weights_only unpickler unless params.yaml says `trust_checkpoints: true`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from yolo_compress.config import DataConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.errors import ModelError
from yolo_compress.models import load_model, read_checkpoint, set_checkpoint_trust

from .conftest import REPO, random_model

MARKER_TEXT = "unpickling ran code"


def write_marker(path: str) -> str:
    """What a malicious checkpoint runs when unpickled; here it only leaves a file behind."""
    Path(path).write_text(MARKER_TEXT)
    return "payload"


class Payload:
    """Pickles as a call to write_marker(marker)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return write_marker, (str(self.marker),)


@pytest.fixture
def trust() -> Iterator[Callable[[bool], None]]:
    """set_checkpoint_trust for the test; the process is back to the safe default afterwards."""
    yield set_checkpoint_trust
    set_checkpoint_trust(False)


@pytest.fixture
def payload_pt(tmp_path: Path) -> tuple[Path, Path]:
    """A valid YOLO checkpoint that also carries a Payload, and the marker file it would write."""
    ckpt = torch.load(random_model(tmp_path / "plain.pt"), map_location="cpu", weights_only=False)
    marker = tmp_path / "marker.txt"
    ckpt["extra"] = Payload(marker)
    torch.save(ckpt, tmp_path / "payload.pt")
    return tmp_path / "payload.pt", marker


def test_a_checkpoint_that_runs_code_is_refused_in_one_line_unless_trusted(
        payload_pt: tuple[Path, Path], trust: Callable[[bool], None]) -> None:
    path, marker = payload_pt
    with pytest.raises(ModelError) as refused:
        load_model(path, "teacher.model")
    message = str(refused.value)
    assert message.startswith(f"teacher.model: {path} holds tests.test_safety.write_marker, which only full "
                              "unpickling can load")
    assert message.endswith("set `trust_checkpoints: true` in params.yaml") and "\n" not in message
    with pytest.raises(ModelError, match=r"distill.teacher: .* holds tests.test_safety.write_marker"):
        read_checkpoint(path, "distill.teacher")
    assert not marker.exists()

    trust(True)
    assert load_model(path, "teacher.model").task == "detect"
    assert marker.read_text() == MARKER_TEXT


def test_the_train_stage_refuses_it_before_training(payload_pt: tuple[Path, Path], tmp_path: Path) -> None:
    path, marker = payload_pt
    prepare_dataset(DataConfig(image_size=64, train_images=4, val_images=2, test_images=2, test_shift_images=2),
                    seed=0, root=tmp_path / "prepared")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"student": {"model": str(path), "imgsz": 64}}))
    out = subprocess.run(
        [sys.executable, str(REPO / "stages" / "train.py"), "--role", "student", "--data", "prepared", "--out",
         "student.pt", "--metrics", "student.json", "--plots", "curve.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: student.model: {path} holds ")
    assert "trust_checkpoints: true" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_a_pruned_checkpoint_loads_safely_in_a_fresh_process(tmp_path: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    from yolo_compress.models import count_params
    from yolo_compress.prune.channel_pruning import prune_round
    from yolo_compress.prune.rounds import save_pruned
    from yolo_compress.splitfree import make_split_free

    model = make_split_free(DetectionModel("yolo11n.yaml", nc=2, verbose=False))
    prune_round(model, torch.rand(1, 3, 64, 64), 0.5, "l2", target="channels")
    path = save_pruned(model, tmp_path / "pruned.pt")
    # Before the project is imported, torch lists the project's own pickled classes as unsafe: it is the allow-list
    # that makes this load pass, not a checkpoint without custom classes.
    code = (f"import torch; unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(r'{path}'); "
            "import ultralytics.nn.tasks as t; from yolo_compress.models import YOLO, read_checkpoint; "
            f"m = YOLO(r'{path}'); read_checkpoint(r'{path}'); "
            "print('yolo_compress.splitfree.SplitFreeC2f' in unsafe, t.SAFE_LOAD, m.task, "
            "sum(p.numel() for p in m.model.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["True", "True", "detect", str(count_params(model))]


class SystemCall:
    """Pickles as os.system(...): a module torch blocks outright (its refusal is worded unlike a plain global's)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _write_bad(kind: str, path: Path, tmp_path: Path) -> str:
    """Write one kind of bad .pt at `path`; return the start of the message expected after '<key>: <path> '."""
    if kind == "blocked module":
        ckpt = torch.load(random_model(tmp_path / "plain.pt"), map_location="cpu", weights_only=False)
        torch.save({**ckpt, "extra": SystemCall(tmp_path / "ran")}, path)
        return f"holds {os.system.__module__}.system, which only full unpickling can load"
    if kind == "text":
        path.write_text("these are not weights\n")
        return "is not a PyTorch checkpoint: neither a torch.save archive nor a pickle (it starts with text b'these"
    if kind == "state_dict":
        torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, path)
        return "is a dict without a 'model' entry (keys: conv.weight): a bare state_dict"
    if kind == "another library":
        torch.save({"model": torch.nn.Linear(2, 2)}, path)
        return "holds a torch.nn.modules.linear.Linear, a model of another library"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["blocked module", "text", "state_dict", "another library"])
def test_a_refused_checkpoint_says_what_it_holds_in_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind.replace(' ', '_')}.pt"
    expected = _write_bad(kind, path, tmp_path)
    with pytest.raises(ModelError) as refused:
        load_model(path, "teacher.model")
    message = str(refused.value)
    assert message.startswith(f"teacher.model: {path} {expected}"), message
    assert "\n" not in message and "Error)" not in message  # a reason, not an exception class name
    assert not (tmp_path / "ran").exists()
