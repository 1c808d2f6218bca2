from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from yolo_compress.config import DataConfig, TrainConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.data.prepared import training_view
from yolo_compress.devices import check_device, device_problem
from yolo_compress.errors import ModelError, ParamsError, interrupted_message, resume_from
from yolo_compress.models import YOLO, load_model
from yolo_compress.train.metrics import teacher_gap
from yolo_compress.train.training import RUN_KEY, metric_key, resumable_epoch, train_model

from .conftest import REPO

TINY_DATA = DataConfig(image_size=64, train_images=8, val_images=4, test_images=2, test_shift_images=2)


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "prepared"
    prepare_dataset(TINY_DATA, seed=0, root=root)
    return training_view(root, root.parent / "view")


def test_metric_keys_read_well_in_dvc() -> None:
    assert metric_key("metrics/mAP50-95(B)") == "map50_95"
    assert metric_key("metrics/mAP50(P)") == "pose_map50"
    assert metric_key("val/box_loss") == "val_box_loss"
    assert metric_key("metrics/precision(B)") == "precision"


def test_same_params_and_seed_give_the_same_metrics(data_yaml: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="yolo11n.yaml", epochs=2, imgsz=64, batch=4, close_mosaic=1, lr0=0.01)
    runs = [train_model(cfg, YOLO(cfg.model), data_yaml, tmp_path / f"run{i}", seed=3) for i in range(2)]
    for a, b in zip(runs[0].curve, runs[1].curve, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert runs[0].val == runs[1].val
    assert [row["epoch"] for row in runs[0].curve] == [1, 2]
    assert runs[0].best.is_file() and runs[0].seconds_per_epoch > 0
    # The losses are real numbers from real training, and differ between epochs.
    assert runs[0].curve[0]["train_box_loss"] != runs[0].curve[1]["train_box_loss"]


def test_one_optimizer_step_per_batch_unless_nbs_asks_for_more(data_yaml: Path, tmp_path: Path) -> None:
    """Ultralytics accumulates gradients over nbs / batch batches (its nbs 64: 4 batches of 16). The default nbs null
    steps after every batch; nbs = 2 x batch accumulates two."""
    for nbs, accumulate in ((None, 1), (8, 2)):
        cfg = TrainConfig(model="yolo11n.yaml", epochs=1, imgsz=64, batch=4, nbs=nbs, close_mosaic=0)
        model = YOLO(cfg.model)
        train_model(cfg, model, data_yaml, tmp_path / f"nbs{nbs}", seed=3)
        assert model.trainer.args.nbs == cfg.nominal_batch and model.trainer.accumulate == accumulate


def test_teacher_gap_flags_a_weak_teacher() -> None:
    assert teacher_gap({"map50_95": 0.50}, {"map50_95": 0.40}, 0.05) == {"map50_95": pytest.approx(0.10),
                                                                         "teacher_clearly_better": 1}
    assert teacher_gap({"map50_95": 0.42}, {"map50_95": 0.40}, 0.05)["teacher_clearly_better"] == 0
    assert teacher_gap({"map50_95": 0.30}, {"map50_95": 0.40}, 0.0)["teacher_clearly_better"] == 0


def test_missing_or_bogus_model_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"teacher.model: model file .*missing.pt not found"):
        load_model(tmp_path / "missing.pt", "teacher.model")
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"teacher.model: .*bogus.pt is not a PyTorch checkpoint: neither"):
        load_model(bogus, "teacher.model")
    with pytest.raises(ModelError, match=r"student.model: model yaml nosuch.yaml not found"):
        load_model("nosuch.yaml", "student.model")


def test_a_device_that_does_not_exist_is_one_line_naming_what_the_machine_has() -> None:
    assert device_problem("0", "teacher.device", cuda_count=0) == (
        "teacher.device: '0' asks for CUDA device 0, but this machine has no CUDA device; use teacher.device: cpu")
    assert device_problem("0,2", "student.device", cuda_count=2) == (
        "student.device: '0,2' asks for CUDA device 2, but this machine has 2 CUDA devices: 0, 1; use "
        "student.device: cpu or one of 0, 1")
    assert device_problem("mps", "benchmark.device", cuda_count=0, mps=False).endswith("use benchmark.device: cpu")
    for ok in ("cpu", "0", 1, "0,1"):
        assert device_problem(ok, "teacher.device", cuda_count=2) is None
    check_device("cpu", "teacher.device")
    missing = str(torch.cuda.device_count())  # "0" on a machine without CUDA
    with pytest.raises(ParamsError, match=rf"^teacher.device: '{missing}' asks for CUDA device {missing}, but "):
        check_device(missing, "teacher.device")


@pytest.mark.parametrize("key", ["teacher.device", "student.device", "benchmark.device"])
def test_prepare_checks_every_device_before_making_the_dataset(tmp_path: Path, key: str) -> None:
    missing = str(torch.cuda.device_count())
    section, name = key.split(".")
    params = {s: {"model": "yolo11n.yaml"} for s in ("teacher", "student")}
    params.setdefault(section, {})[name] = missing
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([sys.executable, str(REPO / "stages" / "prepare.py"), "--out", "data/prepared", "--metrics",
                          "m.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: {device_problem(missing, key, torch.cuda.device_count())}"
    assert not (tmp_path / "data").exists() and not (tmp_path / "m.json").exists()


def test_the_train_stage_checks_the_device_before_loading_anything(tmp_path: Path) -> None:
    missing = str(torch.cuda.device_count())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"teacher": {"model": "yolo11n.yaml", "device": missing}}))
    out = subprocess.run(  # no dataset at all: the device line must come first
        [sys.executable, str(REPO / "stages" / "train.py"), "--role", "teacher", "--data", "nowhere", "--out",
         "t.pt", "--metrics", "t.json", "--plots", "c.json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: {device_problem(missing, 'teacher.device', torch.cuda.device_count())}"
    assert "Traceback" not in out.stderr


class Interrupt(KeyboardInterrupt):
    """What Ctrl-C raises, from inside the epoch loop."""


def _interrupt_in_second_epoch(trainer: object) -> None:
    if trainer.epoch == 1:
        raise Interrupt


def interrupted_after_first_epoch(cfg: TrainConfig, data_yaml: Path, work: Path, **kw: object) -> None:
    model = YOLO(cfg.model)
    model.add_callback("on_train_batch_start", _interrupt_in_second_epoch)
    with pytest.raises(Interrupt):
        train_model(cfg, model, data_yaml, work, seed=3, **kw)


def test_an_interrupted_run_resumes_where_it_stopped_only_when_asked(data_yaml: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="yolo11n.yaml", epochs=3, imgsz=64, batch=4, close_mosaic=1, lr0=0.01)
    work = tmp_path / "train"
    interrupted_after_first_epoch(cfg, data_yaml, work)
    key = (work / RUN_KEY).read_text().strip()
    assert resumable_epoch(work, key, cfg.epochs) == 1
    # what the interrupted stage would print (errors.stage_entrypoint)
    assert interrupted_message("train_student", resume_from()).endswith("rerun with resume: true to continue from "
                                                                         "epoch 2")
    assert resumable_epoch(work, "another-key", cfg.epochs) is None  # other params or inputs: never resumed
    curve = work / "curve.json"
    saved = curve.read_bytes()
    curve.unlink()  # as if killed after last.pt was written but before the epoch-end callback saved the curve
    assert resumable_epoch(work, key, cfg.epochs) is None
    curve.write_bytes(saved)

    seen: list[float] = []
    resumed = train_model(cfg, YOLO(cfg.model), data_yaml, work, seed=3, resume=True,
                          on_epoch=lambda row: seen.append(row["epoch"]))
    assert [r["epoch"] for r in resumed.curve] == [1, 2, 3]
    assert seen == [1, 2, 3]  # the epoch before the interruption is replayed into the new run's tracking
    assert resumed.val["map50_95"] >= 0 and YOLO(str(resumed.best)).task == "detect"
    assert resumable_epoch(work, key, cfg.epochs) is None  # finished: optimizer stripped, nothing to resume


def test_without_resume_an_interrupted_run_restarts_from_scratch(data_yaml: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="yolo11n.yaml", epochs=2, imgsz=64, batch=4, close_mosaic=1, lr0=0.01)
    work = tmp_path / "train"
    interrupted_after_first_epoch(cfg, data_yaml, work)
    fresh = train_model(cfg, YOLO(cfg.model), data_yaml, work, seed=3)
    clean = train_model(cfg, YOLO(cfg.model), data_yaml, tmp_path / "clean", seed=3)
    assert fresh.val == clean.val  # a restart is the uninterrupted run, bit for bit


def test_a_checkpoint_torn_by_sigkill_is_not_resumed(data_yaml: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="yolo11n.yaml", epochs=2, imgsz=64, batch=4, close_mosaic=1, lr0=0.01)
    work = tmp_path / "train"
    interrupted_after_first_epoch(cfg, data_yaml, work)
    last = work / "weights" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert resumable_epoch(work, (work / RUN_KEY).read_text().strip(), cfg.epochs) is None
    result = train_model(cfg, YOLO(cfg.model), data_yaml, work, seed=3, resume=True)
    assert [r["epoch"] for r in result.curve] == [1, 2]
