"""A tiny copy of this repo that has run the whole pipeline once: shared by the tests that drive real DVC."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from yolo_compress.typed_params import READS_ENV

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"image_size": 96, "train_images": 12, "val_images": 6, "test_images": 4, "test_shift_images": 4},
    "teacher": {"model": "yolo11n.yaml", "epochs": 2, "imgsz": 96, "batch": 4, "close_mosaic": 1},
    "student": {"model": "yolo11n.yaml", "epochs": 1, "imgsz": 96, "batch": 4, "close_mosaic": 0},
    "prune": {"rounds": 2, "target": 0.5, "finetune_epochs": 1, "last_round_epochs": None},
    "export": {"imgsz": 96, "calib_images": 4},
    "evaluate": {"imgsz": 96, "batch": 4},
    "benchmark": {"imgsz": 96, "batch": 2, "warmup": 1, "repeats": 3, "rounds": 3},
}
STAGES = {"prepare", "train_teacher", "train_student", "distill", "prune", "export", "evaluate", "benchmark",
          "report"}
MODELS = ("teacher", "student", "distilled", "pruned")
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def clean_env() -> dict[str, str]:
    """This environment without the test session's MLflow/DVC settings, with this venv's tools on PATH."""
    # ULTRALYTICS_SAFE_LOAD: set by yolo_compress.models in this process; a user's plain `YOLO(path)` has not got it
    leaked = ("MLFLOW_", "DVC_", "PYTEST_", "ULTRALYTICS_SAFE_LOAD")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaked)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def make_repo(dst: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC copy of the working tree at `dst` with tiny params, after one `dvc repro`, all committed."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stale in ("dvc.lock", "metrics", "plots"):
        shutil.rmtree(dst / stale, ignore_errors=True) if (dst / stale).is_dir() else (dst / stale).unlink(True)

    env = clean_env()
    run(["git", "init", "-q", "-b", "main"], dst, env)
    run([*GIT, "add", "-A"], dst, env)
    run([*GIT, "commit", "-qm", "tiny"], dst, env)
    run(["dvc", "repro"], dst, {**env, READS_ENV: str(reads_file(dst))})  # each stage notes the params it read
    run([*GIT, "add", "-A"], dst, env)
    run([*GIT, "commit", "-qm", "tiny pipeline results"], dst, env)  # as a user commits dvc.lock and metrics
    return dst, env


def reads_file(repo: Path) -> Path:
    """Where the first `dvc repro` of a tiny repo left the params keys each stage read (typed_params.READS_ENV)."""
    return repo.parent / "params_reads.jsonl"


def copy_repo(src: Path, dst: Path) -> Path:
    """An independent copy (git, DVC cache, outputs, MLflow store; no scratch runs/) for a test that breaks things."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("tmp", "runs"))
    return dst


@contextlib.contextmanager
def edited_params(root: Path, edit: Callable[[dict], None]) -> Iterator[None]:
    """params.yaml edited in place by `edit(params)` for the block, then restored byte for byte."""
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    edit(params)
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        yield
    finally:
        (root / "params.yaml").write_text(original)


def dry_run_stages(root: Path, env: dict[str, str]) -> set[str]:
    """The stages `dvc repro --dry` would run."""
    out = run(["dvc", "repro", "--dry"], root, env).stdout
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
