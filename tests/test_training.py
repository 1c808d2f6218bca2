from __future__ import annotations

from pathlib import Path

import pytest

from yolo_compress.config import DataConfig, TrainConfig
from yolo_compress.dataset import prepare_dataset, training_view
from yolo_compress.errors import ModelError
from yolo_compress.metrics import teacher_gap
from yolo_compress.models import YOLO, load_model
from yolo_compress.training import metric_key, train_model

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
    with pytest.raises(ModelError, match=r"teacher.model: .*bogus.pt is not an Ultralytics YOLO checkpoint"):
        load_model(bogus, "teacher.model")
    with pytest.raises(ModelError, match=r"student.model: model yaml nosuch.yaml not found"):
        load_model("nosuch.yaml", "student.model")
