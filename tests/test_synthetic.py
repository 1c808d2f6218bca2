"""Synthetic generator: determinism, classes, size buckets, occlusion rules, pose layout and distribution shift."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_compress.config import DataConfig
from yolo_compress.data.synthetic import MAX_CLASSES, SPLIT_CODES, class_names, generate_synthetic, pose_layout

TINY = {"image_size": 64, "train_images": 4, "val_images": 2, "test_images": 2, "test_shift_images": 2}


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def read_labels(root: Path, split: str) -> list[np.ndarray]:
    return [np.loadtxt(p, ndmin=2) for p in sorted((root / "labels" / split).glob("*.txt"))]


@pytest.fixture(scope="module")
def detect256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("detect256")
    cfg = DataConfig(train_images=40, val_images=2, test_images=20, test_shift_images=20)
    generate_synthetic(root, cfg, seed=3)
    return root


@pytest.fixture(scope="module")
def pose256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pose256")
    cfg = DataConfig(task="pose", train_images=30, val_images=1, test_images=1, test_shift_images=1)
    generate_synthetic(root, cfg, seed=5)
    return root


@pytest.mark.parametrize("task", ["detect", "pose"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, task: str) -> None:
    cfg = DataConfig(task=task, **TINY)
    generate_synthetic(tmp_path / "a", cfg, 7)
    generate_synthetic(tmp_path / "b", cfg, 7)
    generate_synthetic(tmp_path / "c", cfg, 8)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert tree_hash(tmp_path / "a") != tree_hash(tmp_path / "c")
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.*"))
    assert files[0] == "images/test/000001.png" and len(files) == 2 * 10


def test_splits_are_independent_of_each_other(tmp_path: Path) -> None:
    generate_synthetic(tmp_path / "a", DataConfig(**TINY), 0)
    generate_synthetic(tmp_path / "b", DataConfig(**{**TINY, "train_images": 9}), 0)
    # More train images change nothing in val, and the first train images stay the same.
    for rel in ("images/val/000001.png", "labels/val/000002.txt", "images/train/000004.png"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a/images/val/000001.png").read_bytes() != (tmp_path / "a/images/test/000001.png").read_bytes()
    assert list(SPLIT_CODES) == ["train", "val", "test", "test_shift"]


def test_class_names() -> None:
    assert class_names(DataConfig()) == ["circle", "square", "triangle", "star", "cross", "ring"]
    names = class_names(DataConfig(classes=MAX_CLASSES))
    assert MAX_CLASSES == 80 and len(set(names)) == 80
    assert class_names(DataConfig(task="pose")) == ["figure"]


def test_detect_labels_classes_and_size_buckets(detect256: Path) -> None:
    rows = np.concatenate(read_labels(detect256, "train"))
    assert rows.shape[1] == 5
    assert set(rows[:, 0].astype(int)) == set(range(6))
    assert (rows[:, 1:] >= 0).all() and (rows[:, 1:] <= 1).all() and (rows[:, 3:] > 0).all()
    # Boxes lie inside the image.
    assert (rows[:, 1] - rows[:, 3] / 2 >= -1e-6).all() and (rows[:, 1] + rows[:, 3] / 2 <= 1 + 1e-6).all()
    area = rows[:, 3] * rows[:, 4] * 256**2
    assert (area < 32**2).sum() >= 10 and ((area >= 32**2) & (area < 96**2)).sum() >= 10 and (area >= 96**2).sum() >= 5
    per_image = [len(r) for r in read_labels(detect256, "train")]
    assert max(per_image) >= 4 and min(per_image) >= 0 and max(per_image) <= 8


def test_detect_images_are_cluttered_and_textured(detect256: Path) -> None:
    img = cv2.imread(str(detect256 / "images/train/000001.png"))
    assert img.shape == (256, 256, 3)
    # Textured backgrounds and clutter: many distinct colours, not a flat canvas with a few shapes.
    stds = [cv2.imread(str(p)).std() for p in sorted((detect256 / "images/train").glob("*.png"))[:10]]
    assert min(stds) > 5
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200


def test_test_shift_is_darker_and_smaller(detect256: Path) -> None:
    def mean_brightness(split: str) -> float:
        return float(np.mean([cv2.imread(str(p)).mean() for p in (detect256 / "images" / split).glob("*.png")]))

    def small_share(split: str) -> float:
        rows = np.concatenate(read_labels(detect256, split))
        return float((rows[:, 3] * rows[:, 4] * 256**2 < 32**2).mean())

    assert mean_brightness("test_shift") < mean_brightness("test") - 10
    assert small_share("test_shift") > small_share("test")
    shifted = set(np.concatenate(read_labels(detect256, "test_shift"))[:, 0].astype(int))
    assert shifted <= set(range(6))


@pytest.mark.parametrize("k", range(5, 18))
def test_pose_layout(k: int) -> None:
    names, flip_idx, skeleton = pose_layout(k)
    assert len(names) == k == len(set(names)) and names[0] == "head"
    assert sorted(flip_idx) == list(range(k))
    for i, j in enumerate(flip_idx):
        assert flip_idx[j] == i  # involution
        if names[i].startswith("left_"):
            assert names[j] == names[i].replace("left_", "right_")
        elif not names[i].startswith("right_"):
            assert j == i
    assert len(skeleton) == k - 1  # a tree over the keypoints, 1-based
    assert all(1 <= a <= k and 1 <= b <= k and a != b for a, b in skeleton)
    assert {b for _, b in skeleton} == set(range(2, k + 1))


def test_pose_labels(pose256: Path) -> None:
    k = DataConfig().keypoints
    rows = np.concatenate(read_labels(pose256, "train"))
    assert rows.shape[1] == 5 + 3 * k
    assert (rows[:, 0] == 0).all() and (rows[:, 1:5] >= 0).all() and (rows[:, 1:5] <= 1).all()
    kp = rows[:, 5:].reshape(-1, k, 3)
    vis = kp[..., 2]
    assert set(np.unique(vis)) == {0, 1, 2}
    assert (kp[vis == 0][:, :2] == 0).all()
    inside = kp[vis > 0][:, :2]
    assert (inside >= 0).all() and (inside <= 1).all()
    # Labelled keypoints lie in (or on the edge of) their figure's box.
    x, y = kp[..., 0], kp[..., 1]
    x0, x1 = (rows[:, 1] - rows[:, 3] / 2)[:, None], (rows[:, 1] + rows[:, 3] / 2)[:, None]
    y0, y1 = (rows[:, 2] - rows[:, 4] / 2)[:, None], (rows[:, 2] + rows[:, 4] / 2)[:, None]
    tol = 2 / 256
    ok = (x >= x0 - tol) & (x <= x1 + tol) & (y >= y0 - tol) & (y <= y1 + tol)
    assert ok[vis > 0].all()
    counts = [len(r) for r in read_labels(pose256, "train")]
    assert max(counts) <= 4 and sum(counts) >= 30


def test_pose_keypoint_count_follows_config(tmp_path: Path) -> None:
    generate_synthetic(tmp_path, DataConfig(task="pose", keypoints=17, **TINY), 0)
    rows = np.concatenate(read_labels(tmp_path, "train"))
    assert rows.shape[1] == 5 + 17 * 3
