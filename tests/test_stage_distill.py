"""stages/distill.py: one-line errors on bad input (in-process, no training) and one tiny real sl2 run (64 px)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from ultralytics.nn.tasks import DetectionModel

from yolo_compress.config import DataConfig, DistillConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.train.trainer import TrainerSpec, distill_setup

from .conftest import REPO

STAGE = REPO / "stages" / "distill.py"
NC = 6  # the synthetic dataset's classes
TINY_STUDENT = {"model": "yolo11n.yaml", "epochs": 1, "imgsz": 64, "batch": 4, "close_mosaic": 0, "mosaic": 0.0,
                "workers": 0}
STUDENT_SECONDS_PER_EPOCH = 2.0
STUDENT_MAP = 0.01


def teacher_checkpoint(path: Path, nc: int) -> Path:
    torch.manual_seed(0)
    torch.save({"model": DetectionModel("yolo11s.yaml", nc=nc, verbose=False).half()}, path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage working dir: tiny dataset, a 6-class and a 3-class teacher, a baseline student metrics file."""
    ws = tmp_path_factory.mktemp("distill_ws")
    prepare_dataset(DataConfig(image_size=64, train_images=8, val_images=4, test_images=2, test_shift_images=2),
                    seed=0, root=ws / "data" / "prepared")
    teacher_checkpoint(ws / "teacher.pt", NC)
    teacher_checkpoint(ws / "teacher_nc3.pt", 3)
    (ws / "metrics").mkdir()
    (ws / "metrics" / "student.json").write_text(json.dumps(
        {"val": {"map50_95": STUDENT_MAP}, "train": {"seconds_per_epoch": STUDENT_SECONDS_PER_EPOCH}}))
    (ws / "empty_unlabeled").mkdir()
    (ws / "empty_unlabeled" / "notes.txt").write_text("not an image")
    return ws


def write_params(ws: Path, name: str, **distill: Any) -> str:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["student"].update(TINY_STUDENT)
    params["distill"].update(distill)
    (ws / name).write_text(yaml.safe_dump(params, sort_keys=False))
    return name


def stage_argv(params: str, teacher: str = "teacher.pt", out: str = "out") -> list[str]:
    return ["--params", params, "--data", "data/prepared", "--teacher", teacher,
            "--student-metrics", "metrics/student.json", "--out", f"{out}/distilled.pt",
            "--metrics", f"{out}/metrics.json", "--plots", f"{out}/plots.json"]


@pytest.mark.parametrize(("case", "distill", "teacher", "expected"), [
    ("missing teacher", {}, "nosuch.pt", "error: distill.teacher: model file nosuch.pt not found"),
    ("teacher of another nc", {}, "teacher_nc3.pt", "error: teacher teacher_nc3.pt has nc 3 but the dataset "
     "data/prepared has nc 6"),
    ("empty unlabeled", {"unlabeled": "empty_unlabeled"}, "teacher.pt",
     "error: distill.unlabeled: no images under empty_unlabeled"),
    ("missing unlabeled", {"unlabeled": "nowhere"}, "teacher.pt",
     "error: distill.unlabeled: folder nowhere not found"),
])
def test_bad_input_exits_2_with_one_line(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], case: str, distill: dict[str, Any],
                                         teacher: str, expected: str, tmp_path: Path) -> None:
    for item in workspace.iterdir():  # own cwd, so `runs/` here can only come from this call
        (tmp_path / item.name).symlink_to(item)
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path, "params_bad.yaml", **distill)
    spec = importlib.util.spec_from_file_location("stage_distill", STAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["distill.py", *stage_argv(params, teacher)])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # refused before training


@pytest.mark.parametrize("loss", ["sl2", "mgd", "cwd", "logit"])
def test_every_loss_goes_through_the_projects_criterion(tmp_path: Path, loss: str) -> None:
    # one sl2: the same path as the other losses, with schedules and unlabeled images (no native special case)
    teacher = tmp_path / "t.pt"
    cfg = DistillConfig(loss=loss, schedule="cosine", unlabeled="extra")
    (spec,) = distill_setup(cfg, teacher).values()
    assert spec.distill == dataclasses.replace(cfg, teacher=str(teacher.resolve())) and not spec.keep_model
    assert TrainerSpec.from_json(spec.to_json()) == spec  # what a DDP process reads back


@pytest.mark.slow
def test_tiny_sl2_run_writes_plain_student_and_sane_metrics(workspace: Path, isolated_mlflow: str) -> None:
    params = write_params(workspace, "params_sl2.yaml", loss="sl2")
    env = {**os.environ, "YOLO_CONFIG_DIR": str(workspace / ".ultralytics")}
    proc = subprocess.run([sys.executable, str(STAGE), *stage_argv(params)], cwd=workspace, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    m = json.loads((workspace / "out" / "metrics.json").read_text())
    assert set(m) == {"val", "train", "distill", "vs_student", "model", "mlflow_run_id"}
    for section in m.values():  # dvc metrics: numbers only (the run id is the one string), <= 2 levels
        assert isinstance(section, str) or all(isinstance(v, (int, float)) for v in section.values())
    assert set(m["val"]) >= {"map50_95", "map50", "precision", "recall"}
    assert all(0.0 <= v <= 1.0 for v in m["val"].values())
    assert m["train"]["epochs"] == 1 and m["train"]["seconds_per_epoch"] > 0
    assert m["train"]["seconds_per_epoch_ratio_vs_student"] == pytest.approx(
        m["train"]["seconds_per_epoch"] / STUDENT_SECONDS_PER_EPOCH)
    assert m["distill"]["weight"] == 6.0 and m["distill"]["loss_final"] > 0
    assert m["distill"]["teacher_gflops_ratio"] > 1.5  # yolo11s teacher vs yolo11n student
    assert m["vs_student"]["map50_95_gain"] == pytest.approx(m["val"]["map50_95"] - STUDENT_MAP)

    curve = json.loads((workspace / "out" / "plots.json").read_text())
    assert [r["epoch"] for r in curve] == [1]
    assert curve[0]["train_dis_loss"] == m["distill"]["loss_final"] and curve[0]["train_box_loss"] > 0

    # plain student: stock Ultralytics in a fresh process, the student's parameter count, nothing of the teacher
    code = ("import sys; from ultralytics import YOLO; m = YOLO(sys.argv[1]).model; "
            "hooks = sum(len(x._forward_hooks) for x in m.modules()); "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()), hooks, "
            "hasattr(m, 'distill_adapters'), m.args.get('distill_model'))")
    out = subprocess.run([sys.executable, "-c", code, "out/distilled.pt"], cwd=workspace, capture_output=True,
                         text=True, check=True, env={**env, "YOLO_OFFLINE": "1"}).stdout.split()[-5:]
    plain = sum(p.numel() for p in DetectionModel("yolo11n.yaml", nc=NC, verbose=False).parameters())
    assert out == ["DetectionModel", str(plain), "0", "False", "None"]

    client = MlflowClient(isolated_mlflow)
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.params["loss"] == "sl2" and run.data.params["student.epochs"] == "1"
    assert [x.step for x in client.get_metric_history(run.info.run_id, "train_dis_loss")] == [1]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "plots"}
