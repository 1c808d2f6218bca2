"""Prepared layout, COCO ground truth, validation errors, atomic prepare, user dataset import and training views."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from yolo_compress.config import DataConfig
from yolo_compress.data.dataset import prepare_dataset, validate_layout
from yolo_compress.data.prepared import EVAL_SPLITS, eval_splits, load_summary, training_view
from yolo_compress.data.prepared_layout import SPLITS, LabeledImage, coco_gt
from yolo_compress.errors import DatasetError

TINY = {"image_size": 64, "train_images": 4, "val_images": 2, "test_images": 2, "test_shift_images": 2}


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def detect_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("d") / "prepared"
    prepare_dataset(DataConfig(**TINY), 0, root)
    return root


@pytest.fixture(scope="module")
def pose_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("p") / "prepared"
    prepare_dataset(DataConfig(task="pose", **{**TINY, "image_size": 128}), 0, root)
    return root


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    """A factory copying a prepared root into this test's tmp dir, to be broken there."""

    def make(root: Path) -> Path:
        dst = tmp_path / "prepared"
        shutil.copytree(root, dst)
        return dst

    return make


def write_image(path: Path, size: tuple[int, int] = (48, 40), value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((size[1], size[0], 3), value, np.uint8)
    cv2.rectangle(img, (5, 5), (20, 25), (255, 0, 0), -1)
    assert cv2.imwrite(str(path), img)


def user_dataset(base: Path, pose: bool = False) -> Path:
    """A tiny Ultralytics dataset: jpg + png images, a missing label, a .txt image list for test."""
    kp = " 0.2 0.3 2 0.5 0.5 1 0 0 0" if pose else ""
    write_image(base / "images/train/b.jpg")
    write_image(base / "images/train/a.png", value=30)
    write_image(base / "images/train/sub/c.png", value=60)
    write_image(base / "images/val/v1.png")
    write_image(base / "images/val/v2.jpg")
    write_image(base / "images/extra/t1.png")
    (base / "labels/train/sub").mkdir(parents=True)
    (base / "labels/val").mkdir(parents=True)
    (base / "labels/extra").mkdir(parents=True)
    (base / "labels/train/a.txt").write_text(f"1 0.5 0.5 0.25 0.5{kp}\n\n0 0.1 0.1 0.1 0.1{kp}\n")
    (base / "labels/train/b.txt").write_text(f"0 0.5 0.5 0.2 0.2{kp}\r\n")
    (base / "labels/train/sub/c.txt").write_text("")
    (base / "labels/val/v1.txt").write_text(f"1 0.3 0.3 0.2 0.2{kp}\n")
    (base / "labels/extra/t1.txt").write_text(f"0 0.5 0.5 0.5 0.5{kp}\n")
    (base / "test.txt").write_text("./images/extra/t1.png\n")
    doc = {"path": ".", "train": "images/train", "val": "images/val", "test": "test.txt", "names": {0: "cat", 1: "dog"}}
    if pose:
        doc.update(kpt_shape=[3, 3], flip_idx=[0, 2, 1])
    (base / "data.yaml").write_text(yaml.safe_dump(doc))
    return base / "data.yaml"


# ------------------------------------------------------------------------------------------------------ layout


def test_layout_yamls_and_summary(detect_root: Path) -> None:
    summary = load_summary(detect_root)
    assert summary == validate_layout(detect_root)
    assert summary["task"] == "detect" and summary["nc"] == 6 and summary["kpt_shape"] is None
    assert summary["images"] == {"train": 4, "val": 2, "test": 2, "test_shift": 2}
    for split in SPLITS:
        n = summary["images"][split]
        names = sorted(p.name for p in (detect_root / "images" / split).iterdir())
        assert names == [f"{i:06d}.png" for i in range(1, n + 1)]
        assert sum(summary["size_buckets"][split].values()) == summary["objects"][split]
        doc = yaml.safe_load((detect_root / "splits" / f"{split}.yaml").read_text())
        assert doc["train"] == doc["val"] == doc["test"] == f"../images/{split}"
    data = yaml.safe_load((detect_root / "splits/data.yaml").read_text())
    assert "path" not in data
    assert data["train"] == "../images/train" and data["val"] == "../images/val" and data["test"] == "../images/test"
    assert data["names"] == ["circle", "square", "triangle", "star", "cross", "ring"] and data["nc"] == 6
    assert set(EVAL_SPLITS) < set(SPLITS)


def test_prepare_is_byte_deterministic(tmp_path: Path, detect_root: Path) -> None:
    prepare_dataset(DataConfig(**TINY), 0, tmp_path / "again")
    assert tree_hash(tmp_path / "again") == tree_hash(detect_root)


def test_coco_ground_truth_matches_labels(detect_root: Path) -> None:
    from pycocotools.coco import COCO

    summary = load_summary(detect_root)
    for split in SPLITS:
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(detect_root / "splits" / f"{split}.json"))
        assert len(gt.getImgIds()) == summary["images"][split]
        assert len(gt.getAnnIds()) == summary["objects"][split]
        assert sorted(gt.getCatIds()) == list(range(1, 7))
        for lbl in sorted((detect_root / "labels" / split).glob("*.txt")):
            img_id = int(lbl.stem)
            assert gt.imgs[img_id]["file_name"] == f"{lbl.stem}.png"
            rows = np.loadtxt(lbl, ndmin=2)
            anns = gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))
            assert [a["category_id"] for a in anns] == [int(c) + 1 for c in rows[:, 0]]
            for a, r in zip(anns, rows, strict=True):
                x, y, w, h = a["bbox"]
                assert a["iscrowd"] == 0 and a["area"] == pytest.approx(w * h, abs=0.01)
                assert (x + w / 2) / 64 == pytest.approx(r[1], abs=1e-3) and w / 64 == pytest.approx(r[3], abs=1e-3)


def test_pose_metadata_and_keypoints(pose_root: Path) -> None:
    from pycocotools.coco import COCO

    summary = validate_layout(pose_root)
    assert summary["task"] == "pose" and summary["kpt_shape"] == [11, 3] and summary["names"] == ["figure"]
    data = yaml.safe_load((pose_root / "splits/data.yaml").read_text())
    assert data["kpt_shape"] == [11, 3] and data["flip_idx"] == summary["flip_idx"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(pose_root / "splits/train.json"))
    cat = gt.cats[1]
    assert cat["keypoints"] == summary["kpt_names"] and len(cat["skeleton"]) == 10
    for a in gt.anns.values():
        kp = np.array(a["keypoints"]).reshape(11, 3)
        assert a["num_keypoints"] == int((kp[:, 2] > 0).sum())
        assert (kp[kp[:, 2] == 0] == 0).all()


def test_coco_gt_pure_function() -> None:
    rows = np.array([[2, 0.5, 0.25, 0.5, 0.5, 0.1, 0.2, 2, 0, 0, 0], [0, 0.95, 0.5, 0.2, 0.1, 1, 1, 1, 0.5, 0.5, 2]])
    gt = coco_gt([LabeledImage("000007", 200, 100, rows)], ["a", "b", "c"], [2, 3], ["p", "q"], [[1, 2]])
    assert gt["images"] == [{"id": 7, "file_name": "000007.png", "width": 200, "height": 100}]
    a, b = gt["annotations"]
    assert a["bbox"] == [50.0, 0.0, 100.0, 50.0] and a["area"] == 5000.0 and a["category_id"] == 3
    assert a["keypoints"] == [20.0, 20.0, 2, 0, 0, 0] and a["num_keypoints"] == 1
    assert b["bbox"] == [170.0, 45.0, 30.0, 10.0]  # clipped to the image
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3] and gt["categories"][0]["keypoints"] == ["p", "q"]


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("7 0.5 0.5 0.1 0.1", "class id 7 >= nc 6 (valid ids 0..5)"),
        ("1 0.5 1.2 0.1 0.1", "coordinate 1.20 outside [0, 1]"),
        ("1 0.5 0.5 0.1", "expected 5 columns (class cx cy w h), got 4"),
        ("1.5 0.5 0.5 0.1 0.1", "class id 1.5 is not an integer"),
        ("1 0.5 0.5 0.1 abc", "column 5 is 'abc', not a number"),
        ("1 0.5 0.5 0 0.1", "box w is 0, must be > 0"),
    ],
)
def test_bad_detect_label_names_file_and_line(
    detect_root: Path, copy_of: Callable[[Path], Path], line: str, reason: str
) -> None:
    root = copy_of(detect_root)
    lbl = root / "labels/train/000002.txt"
    lbl.write_text(f"0 0.5 0.5 0.1 0.1\n\n{line}\n")
    with pytest.raises(DatasetError) as err:
        validate_layout(root)
    assert str(err.value) == f"{lbl}:3: {reason}" or str(err.value).startswith(f"{lbl}:3: {reason} (")
    assert "\n" not in str(err.value)


def test_bad_pose_labels(pose_root: Path, copy_of: Callable[[Path], Path]) -> None:
    root = copy_of(pose_root)
    lbl = root / "labels/val/000001.txt"
    good = "0 0.5 0.5 0.2 0.2" + " 0.5 0.5 2" * 11
    lbl.write_text(f"{good}\n{good[: -len(' 0.5 0.5 2')]}\n")
    msg = r"000001\.txt:2: expected 5 \+ 11\*3 = 38 columns \(11 keypoints x 3\), got 35"
    with pytest.raises(DatasetError, match=msg):
        validate_layout(root)
    lbl.write_text(f"{good[:-1]}5\n")
    with pytest.raises(DatasetError, match=r"000001\.txt:1: keypoint 10 visibility 5 not in \{0, 1, 2\}"):
        validate_layout(root)
    lbl.write_text(f"{good[:-9]}1.5 0.5 2\n")
    msg = r"000001\.txt:1: coordinate 1\.50 outside \[0, 1\] \(column 36, keypoint 10 x\)"
    with pytest.raises(DatasetError, match=msg):
        validate_layout(root)


def test_corrupt_image(detect_root: Path, copy_of: Callable[[Path], Path]) -> None:
    root = copy_of(detect_root)
    img = root / "images/test/000002.png"
    img.write_bytes(img.read_bytes()[:60])
    with pytest.raises(DatasetError) as err:
        validate_layout(root)
    assert str(err.value) == f"{img}: corrupt image (cannot be decoded); replace or delete it"


def test_empty_split_missing_label_and_stale_summary(detect_root: Path, copy_of: Callable[[Path], Path]) -> None:
    root = copy_of(detect_root)
    (root / "labels/train/000001.txt").write_text("")
    with pytest.raises(DatasetError, match=r"dataset\.json: objects\['train'\] is \d+ but the files give \d+"):
        validate_layout(root)
    shutil.copyfile(detect_root / "labels/train/000001.txt", root / "labels/train/000001.txt")
    (root / "labels/val/000002.txt").unlink()
    with pytest.raises(DatasetError, match=r"labels/val/000002\.txt: missing label file for image "):
        validate_layout(root)
    for p in [*(root / "images/val").iterdir(), *(root / "labels/val").iterdir()]:
        p.unlink()
    with pytest.raises(DatasetError) as err:
        validate_layout(root)
    assert str(err.value) == f"split 'val' has no images in {root / 'images/val'}"


def test_missing_source_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"^data\.source: nope/data\.yaml not found; "):
        prepare_dataset(DataConfig(source="nope/data.yaml"), 0, tmp_path / "prepared")
    assert not (tmp_path / "prepared.tmp").exists() and not (tmp_path / "prepared").exists()


def test_failed_prepare_keeps_previous_root(tmp_path: Path, detect_root: Path) -> None:
    root = tmp_path / "prepared"
    shutil.copytree(detect_root, root)
    before = tree_hash(root)
    data_yaml = user_dataset(tmp_path / "user")
    bad = tmp_path / "user/labels/val/v1.txt"
    bad.write_text("0 0.5 0.5 0.1 0.1\n5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, root)
    assert str(err.value) == f"{bad}:2: class id 5 >= nc 2 (valid ids 0..1)"  # the user's file, not the copy
    assert tree_hash(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "user"]  # no .tmp or .old left


def test_user_dataset_errors_name_the_source(tmp_path: Path) -> None:
    data_yaml = user_dataset(tmp_path / "user")
    bad_img = tmp_path / "user/images/val/v2.jpg"
    bad_img.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    assert str(err.value) == f"{bad_img}: corrupt image (cannot be decoded); replace or delete it"
    bad_img.unlink()
    shutil.rmtree(tmp_path / "user/images/val")
    (tmp_path / "user/images/val").mkdir()
    with pytest.raises(DatasetError, match=r"^split 'val' has no images in .*images/val$"):
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    doc = yaml.safe_load(data_yaml.read_text())
    data_yaml.write_text(yaml.safe_dump({**doc, "val": "missing/dir"}))
    with pytest.raises(DatasetError, match=r"data\.yaml: val: .*missing/dir not found"):
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    data_yaml.write_text(yaml.safe_dump({k: v for k, v in doc.items() if k != "val"}))
    with pytest.raises(DatasetError, match=r"'val:' missing; train and val are required"):
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepared.tmp").exists()


# ---------------------------------------------------------------------------------------------------- import


def test_import_user_dataset_round_trip(tmp_path: Path) -> None:
    data_yaml = user_dataset(tmp_path / "user")
    root = tmp_path / "prepared"
    summary = prepare_dataset(DataConfig(source=str(data_yaml)), 0, root)
    assert summary["task"] == "detect" and summary["names"] == ["cat", "dog"] and summary["nc"] == 2
    assert summary["images"] == {"train": 3, "val": 2, "test": 1}  # no test_shift in the source
    assert summary["objects"] == {"train": 3, "val": 1, "test": 1}
    sources = json.loads((root / "sources.json").read_text())
    assert sources["train"] == {
        "000001": "images/train/a.png",
        "000002": "images/train/b.jpg",
        "000003": "images/train/sub/c.png",
    }
    assert sources["test"] == {"000001": "images/extra/t1.png"}
    # PNGs are copied byte for byte, other formats re-encoded from the decoded pixels.
    assert (root / "images/train/000001.png").read_bytes() == (tmp_path / "user/images/train/a.png").read_bytes()
    jpg = cv2.imread(str(tmp_path / "user/images/train/b.jpg"))
    assert np.array_equal(cv2.imread(str(root / "images/train/000002.png")), jpg)
    assert (root / "labels/train/000001.txt").read_text() == (
        "1 0.500000 0.500000 0.250000 0.500000\n0 0.100000 0.100000 0.100000 0.100000\n"
    )
    assert (root / "labels/val/000002.txt").read_text() == ""  # v2.jpg had no label file: a background image
    assert not (root / "splits/test_shift.yaml").exists() and (root / "splits/test.json").is_file()
    assert "test" in yaml.safe_load((root / "splits/data.yaml").read_text())


def test_import_pose_and_polygons(tmp_path: Path) -> None:
    data_yaml = user_dataset(tmp_path / "user", pose=True)
    with pytest.raises(DatasetError, match=r"data\.task is 'detect' but .* has kpt_shape .*set data\.task: pose"):
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    summary = prepare_dataset(DataConfig(source=str(data_yaml), task="pose"), 0, tmp_path / "prepared")
    assert summary["kpt_shape"] == [3, 3] and summary["flip_idx"] == [0, 2, 1]
    kpts = (tmp_path / "prepared/labels/val/000001.txt").read_text().split()[5:]
    assert kpts == "0.200000 0.300000 2 0.500000 0.500000 1 0.000000 0.000000 0".split()
    det = user_dataset(tmp_path / "seg")
    (tmp_path / "seg/labels/val/v1.txt").write_text("1 0.1 0.2 0.5 0.2 0.3 0.6\n")  # a segment polygon
    prepare_dataset(DataConfig(source=str(det)), 0, tmp_path / "prepared2")
    assert (tmp_path / "prepared2/labels/val/000001.txt").read_text() == "1 0.300000 0.400000 0.400000 0.400000\n"


def labelled_share_dataset(base: Path, n: int, unlabeled: int, image_dir: str = "images") -> Path:
    """A dataset whose train split has `n` images, the first `unlabeled` of them without a label file."""
    for split, count in (("train", n), ("val", 2)):
        for i in range(count):
            write_image(base / image_dir / split / f"{i}.png", value=20 + 10 * i)
            if not (split == "train" and i < unlabeled):
                lbl = base / "labels" / split / f"{i}.txt"
                lbl.parent.mkdir(parents=True, exist_ok=True)
                lbl.write_text("0 0.5 0.5 0.2 0.2\n")
    doc = {"path": ".", "train": f"{image_dir}/train", "val": f"{image_dir}/val", "names": ["thing"]}
    (base / "data.yaml").write_text(yaml.safe_dump(doc))
    return base / "data.yaml"


def test_dataset_without_labels_names_image_and_label_folders(tmp_path: Path) -> None:
    data_yaml = labelled_share_dataset(tmp_path / "user", 3, 0)
    shutil.rmtree(tmp_path / "user/labels")
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    msg = str(err.value)
    assert msg.startswith(f"{data_yaml}: split 'train' has no label files: for the 3 images in "
                          f"{tmp_path / 'user/images/train'} Ultralytics reads labels from "
                          f"{tmp_path / 'user/labels/train'}, which does not exist"), msg
    assert "\n" not in msg and not (tmp_path / "prepared").exists() and not (tmp_path / "prepared.tmp").exists()
    # images under pics/ (no images/ folder): Ultralytics looks for the .txt beside each image
    data_yaml = labelled_share_dataset(tmp_path / "pics_user", 3, 0, image_dir="pics")
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    pics = tmp_path / "pics_user/pics/train"
    assert f"in {pics} Ultralytics reads labels from {pics} too, since the image path has no images/ folder" in str(
        err.value)


def test_unlabeled_share_over_the_param_is_refused(tmp_path: Path) -> None:
    data_yaml = labelled_share_dataset(tmp_path / "user", 5, 3)  # 60% of train has no label file
    with pytest.raises(DatasetError) as err:
        prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    first = tmp_path / "user/labels/train/0.txt"
    assert str(err.value) == (
        f"{data_yaml}: 3 of 5 images in split 'train' (60%) have no label file (e.g. {first} for "
        f"{tmp_path / 'user/images/train/0.png'}), above data.max_unlabeled_share 0.5; add the labels, or raise "
        "data.max_unlabeled_share if those images are meant as background")
    summary = prepare_dataset(DataConfig(source=str(data_yaml), max_unlabeled_share=0.6), 0, tmp_path / "prepared")
    assert summary["images"]["train"] == 5 and summary["objects"]["train"] == 2


def test_unlabeled_share_under_the_param_imports(tmp_path: Path) -> None:
    data_yaml = labelled_share_dataset(tmp_path / "user", 5, 2)  # 40%: background images, imported as such
    summary = prepare_dataset(DataConfig(source=str(data_yaml)), 0, tmp_path / "prepared")
    assert summary["images"] == {"train": 5, "val": 2} and summary["objects"] == {"train": 3, "val": 2}
    assert (tmp_path / "prepared/labels/train/000001.txt").read_text() == ""


def test_eval_splits_default_to_what_the_data_has() -> None:
    assert eval_splits(None, ["train", "val", "test"], "data/prepared") == ["val", "test"]
    assert eval_splits(None, ["test_shift", "val", "train"], "d") == ["val", "test_shift"]  # pipeline order
    assert eval_splits(["test", "val"], ["train", "val", "test"], "d") == ["test", "val"]
    with pytest.raises(DatasetError) as err:
        eval_splits(["val", "test_shift"], ["train", "val", "test"], "data/prepared")
    assert str(err.value) == ("evaluate.splits lists 'test_shift' that data/prepared does not have (it has val, "
                              "test); remove it, or set evaluate.splits: null to score every split the data has")


# ----------------------------------------------------------------------------------------- params vs dataset


def test_params_models_are_checked_against_the_prepared_dataset(tmp_path: Path, detect_root: Path) -> None:
    from yolo_compress.config import DistillConfig, Params, PruneConfig, StudentConfig, TrainConfig
    from yolo_compress.errors import ModelError
    from yolo_compress.preflight import check_params_models

    from .conftest import random_model

    def error(**sections: object) -> str:
        with pytest.raises(ModelError) as err:
            check_params_models(dataclasses.replace(Params(), **sections), detect_root)
        assert "\n" not in str(err.value)
        return str(err.value)

    three = random_model(tmp_path / "three.pt", nc=3)
    six = random_model(tmp_path / "six.pt", nc=6)
    check_params_models(Params(), detect_root)  # the defaults fit the 6-class detect set
    # teacher.model / student.model .pt are re-headed by the trainer: another class count is fine-tuning, not a mistake
    check_params_models(dataclasses.replace(Params(), student=StudentConfig(model=str(three)),
                                            prune=PruneConfig(model=str(six))), detect_root)
    assert error(distill=DistillConfig(teacher=str(three))) == (
        f"distill.teacher {three} has nc 3 but dataset {detect_root} has nc 6; both must be trained on the same "
        "dataset (same task, classes and keypoints)")
    assert error(prune=PruneConfig(model=str(three))).startswith(f"prune.model {three} has nc 3 but dataset")
    assert error(prune=PruneConfig(model="gone.pt")) == (
        "prune.model: model file gone.pt not found; train it first or fix the path")
    assert error(teacher=TrainConfig(model="missing/teacher.pt")).startswith("teacher.model: model file missing/")
    pose = random_model(tmp_path / "pose.pt", nc=6, pose=True)
    assert error(student=StudentConfig(model=str(pose))) == (
        f"student.model: {pose} is a pose model but the dataset {detect_root} is detect; pick a detect model (e.g. "
        "yolo11n.yaml)")
    assert error(teacher=TrainConfig(model="yolov8n-p6.yaml")).startswith(
        "teacher.model: yolov8n-p6.yaml has head strides [8, 16, 32, 64] but student.model yolo11n.yaml has [8, 16, "
        "32]; distillation needs the same head levels")


# ------------------------------------------------------------------------------------------------------ views


def test_training_view_links_and_yamls(tmp_path: Path, detect_root: Path) -> None:
    view = tmp_path / "view"
    data_yaml = training_view(detect_root, view)
    doc = yaml.safe_load(data_yaml.read_text())
    assert data_yaml == view / "data.yaml" and Path(doc["path"]) == view.resolve()
    assert (doc["train"], doc["val"], doc["test"]) == ("images/train", "images/val", "images/test")
    link = view / "images/train/000001.png"
    assert link.is_symlink() and Path(os.readlink(link)) == (detect_root / "images/train/000001.png").resolve()
    assert not (view / "labels/train/000001.txt").is_symlink()
    (view / "stale.txt").write_text("x")
    split_yaml = training_view(detect_root, view, "test_shift")
    assert not (view / "stale.txt").exists() and not (view / "images/train").exists()
    doc = yaml.safe_load(split_yaml.read_text())
    assert doc["train"] == doc["val"] == doc["test"] == "images/test_shift"
    assert (view / "test_shift.json").read_bytes() == (detect_root / "splits/test_shift.json").read_bytes()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a dataset view; refusing to delete it"):
        training_view(detect_root, other)
    with pytest.raises(DatasetError, match="overlaps the prepared dataset"):
        training_view(detect_root, detect_root / "view")


def test_ultralytics_reads_the_view_and_leaves_root_alone(tmp_path: Path, detect_root: Path) -> None:
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    def snapshot() -> dict[str, float]:
        return {str(p): p.stat().st_mtime for p in detect_root.rglob("*")}

    before = snapshot()
    view = tmp_path / "view"
    data = check_det_dataset(str(training_view(detect_root, view)))
    ds = YOLODataset(img_path=data["train"], data=data, imgsz=64, augment=False, task="detect")
    assert len(ds) == 4 and sum(len(lb["cls"]) for lb in ds.labels) == load_summary(detect_root)["objects"]["train"]
    assert ds[0]["img"].shape[-2:] == (64, 64)
    assert (view / "labels/train.cache").is_file()
    assert snapshot() == before
