from __future__ import annotations

from pathlib import Path

import pytest

from yolo_compress.config import PruneConfig, StudentConfig, load_params
from yolo_compress.errors import ParamsError

from .conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_load_with_documented_types() -> None:
    params = load_params(REPO / "params.yaml")
    assert isinstance(params.student, StudentConfig)
    assert params.data.source == "synthetic"
    assert params.teacher.model.endswith((".yaml", ".pt"))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("teacher:\n  model: yolo11s.yaml\n  epoch: 3\n", "unknown key 'teacher.epoch'; valid keys in teacher: model"),
        ("sed: 1\n", "unknown key 'sed'; valid keys in top level: data, teacher, student, distill, prune, evaluate, "
                      "benchmark, seed"),
        ("teacher:\n  model: yolo11s.yaml\n  epochs: 0\n", "teacher.epochs: expected an int >= 1, got 0"),
        ("student:\n  model: yolo11n.yaml\n  lr0: fast\n", "student.lr0: expected float, got 'fast'"),
        ("student:\n  model: yolo11n.yaml\n  epochs: 2.5\n", "student.epochs: expected int, got 2.5"),
        ("data:\n  task: segment\n", "data.task: expected one of detect, pose, got 'segment'"),
        ("data:\n  source: coco\n", "data.source: expected a built-in dataset (synthetic, digits) or your dataset's "
                                     ".yaml under data/sources/, got 'coco'"),
        ("data:\n  val_images: 0\n", "data.val_images: expected an int >= 1"),
        ("data:\n  max_unlabeled_share: 1.5\n", "data.max_unlabeled_share: expected a float in [0, 1], got 1.5"),
        ("prune:\n  last_round_epochs: -1\n", "prune.last_round_epochs: expected an int >= 0, or null for "
                                              "finetune_epochs, got -1"),
        ("prune:\n  activation: gelu\n", "prune.activation: expected one of keep, relu, got 'gelu'"),
        ("distill:\n  teacher: ''\n", "distill.teacher: expected a local .pt path, got ''"),
        ("evaluate:\n  splits: [val, tset]\n", "evaluate.splits: expected a non-empty list of distinct names from "
                                               "val, test, test_shift, got ['val', 'tset']"),
        ("student:\n  model: yolo11n.yaml\n  imgsz: 100\n", "student.imgsz: expected a multiple of 32"),
        ("student:\n  model: yolo11n.yaml\n  nbs: 8\n", "student.nbs: expected null or an int >= batch (16), got 8"),
        ("student:\n  model: resnet.onnx\n", "student.model: expected a model .yaml or a local .pt path"),
        ("student:\n  epochs: 3\n", "missing key 'student.model'"),
        ("teacher: [1, 2]\n", "teacher: expected a mapping"),
        ("teacher:\n  model: [x\n", "params.yaml:3: not valid YAML"),
    ],
)
def test_bad_params_give_one_line_error_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, text))
    message = str(err.value)
    assert needle in message
    assert "\n" not in message
    assert message.startswith(str(tmp_path / "params.yaml"))


def test_missing_params_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")


def test_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "student:\n  model: yolo11n.yaml\n  lr0: 1e-3\n"))
    assert params.student.lr0 == pytest.approx(1e-3)
    params = load_params(write(tmp_path, "teacher:\n  model: yolo11s.yaml\n  warmup_epochs: 2\n"))
    assert isinstance(params.teacher.warmup_epochs, float)


def test_evaluate_splits_default_to_the_prepared_data(tmp_path: Path) -> None:
    """null (the default) means every eval split prepare made; an explicit list is kept as given."""
    assert load_params(REPO / "params.yaml").evaluate.splits is None
    assert load_params(write(tmp_path, "evaluate:\n  splits: null\n")).evaluate.splits is None
    assert load_params(write(tmp_path, "evaluate:\n  splits: [test, val]\n")).evaluate.splits == ["test", "val"]


def test_the_last_prune_round_can_fine_tune_longer() -> None:
    same, longer = (PruneConfig(rounds=3, finetune_epochs=3, last_round_epochs=n) for n in (None, 6))
    assert [same.round_epochs(k) for k in (1, 2, 3)] == [3, 3, 3]
    assert [longer.round_epochs(k) for k in (1, 2, 3)] == [3, 3, 6]


def test_epochs_through_a_round_count_the_sparsity_epochs_and_each_round_fine_tune() -> None:
    cfg = PruneConfig(rounds=4, finetune_epochs=3, last_round_epochs=12)
    assert [cfg.epochs_through(k) for k in range(5)] == [0, 3, 6, 9, 21]
    bn = PruneConfig(rounds=2, finetune_epochs=3, last_round_epochs=None, importance="bn", sparsity_epochs=2)
    assert bn.sparsity_training and [bn.epochs_through(k) for k in range(3)] == [2, 5, 8]
