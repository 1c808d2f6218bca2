"""pycocotools scoring on hand-made ground truth, the operating point, and agreement with Ultralytics' own val.

The `slow` marker (register in pyproject: "slow: trains a tiny model, about a minute on 2 CPU cores") marks the
one test that trains.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from yolo_compress.errors import DatasetError, ModelError, UserError
from yolo_compress.measure.evaluation import (
    BOX_KEYS,
    coco_scores,
    evaluate_split,
    gt_json_for,
    oks_sigmas_like_ultralytics,
    operating_point,
    predict_coco,
)
from yolo_compress.models import YOLO

from .conftest import random_model

# ------------------------------------------------------------------------------------------------ hand-made data

# Three 200×200 images, two classes, every size bucket: small < 32², medium < 96², large above.
BOXES = [  # (image_id, category_id, [x, y, w, h])
    (1, 1, [10, 10, 20, 20]),
    (1, 2, [50, 50, 60, 60]),
    (2, 1, [20, 30, 110, 120]),
    (2, 1, [140, 140, 40, 40]),
    (3, 2, [5, 100, 50, 45]),
]


def _gt(boxes: list[tuple[int, int, list[float]]] = BOXES, kpts: dict[int, list[float]] | None = None) -> dict:
    anns = []
    for i, (img, cat, box) in enumerate(boxes, 1):
        ann = {"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        if kpts is not None:
            ann["keypoints"] = kpts[i]
            ann["num_keypoints"] = sum(v > 0 for v in kpts[i][2::3])
        anns.append(ann)
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2, 3)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def _perfect(gt: dict, shift: float = 0.0) -> list[dict[str, Any]]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9,
         "bbox": [a["bbox"][0] + shift, a["bbox"][1] + shift, a["bbox"][2], a["bbox"][3]]}
        for a in gt["annotations"]
    ]


# ----------------------------------------------------------------------------------------------------- coco_scores


def test_perfect_predictions_score_one_on_every_key_but_ar1() -> None:
    scores = coco_scores(_gt(), _perfect(_gt()))
    assert set(scores) == set(BOX_KEYS)
    # AR1 keeps one detection per image and class: image 2 has two class-1 boxes, so class 1 recalls 2 of 3
    assert scores == pytest.approx({**dict.fromkeys(BOX_KEYS, 1.0), "ar1": (2 / 3 + 1) / 2})


def test_small_shift_lowers_map50_95_but_keeps_map50() -> None:
    """2 px on boxes of 20-120 px keeps IoU >= 0.8 > 0.5, but fails the strictest thresholds (0.95 on the 20 px one)."""
    scores = coco_scores(_gt(), _perfect(_gt(), shift=2.0))
    assert scores["map50"] == pytest.approx(1.0)
    assert 0.5 < scores["map50_95"] < 1.0


def test_no_predictions_score_zero(tmp_path: Path) -> None:
    gt_file = tmp_path / "val.json"
    gt_file.write_text(json.dumps(_gt()))
    scores = coco_scores(gt_file, [])
    assert scores["map50_95"] == 0.0 and scores["map50"] == 0.0 and scores["ar100"] == 0.0


def test_wrong_class_scores_zero_and_inputs_are_not_mutated() -> None:
    dets = [{**d, "category_id": 3 - d["category_id"]} for d in _perfect(_gt())]
    before = json.dumps(dets)
    assert coco_scores(_gt(), dets)["map50_95"] == 0.0
    assert json.dumps(dets) == before  # pycocotools' loadRes adds keys to the dicts it gets


def test_size_buckets_without_ground_truth_are_left_out() -> None:
    small_only = [(1, 1, [10, 10, 20, 20]), (2, 2, [30, 30, 25, 25])]
    scores = coco_scores(_gt(small_only), _perfect(_gt(small_only)))
    assert scores["map_small"] == pytest.approx(1.0)
    assert not {"map_medium", "map_large", "ar_medium", "ar_large"} & set(scores)
    assert all(v >= 0 for v in scores.values())  # pycocotools' -1 never leaks out


def test_detections_of_another_split_are_a_one_line_error() -> None:
    dets = _perfect(_gt()) + [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ModelError, match=r"image ids \[99\].*same split") as info:
        coco_scores(_gt(), dets)
    assert "\n" not in str(info.value)


def test_ground_truth_without_objects_is_an_error() -> None:
    with pytest.raises(DatasetError, match="no annotated objects"):
        coco_scores({**_gt(), "annotations": []}, [])


def test_missing_ground_truth_json_is_one_line_user_error(tmp_path: Path) -> None:
    split = tmp_path / "splits" / "test.yaml"
    split.parent.mkdir()
    split.write_text("val: images/test\n")
    with pytest.raises(UserError, match="an eval split without ground truth") as info:
        gt_json_for(split)
    assert str(split.with_suffix(".json")) in str(info.value) and "\n" not in str(info.value)
    (split.with_suffix(".json")).write_text("{}")
    assert gt_json_for(split) == split.with_suffix(".json")


# ------------------------------------------------------------------------------------------------------- keypoints

K = 5


def _kpt_gt() -> tuple[dict, list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    kpts = {}
    for i, (_, _, (x, y, w, h)) in enumerate(BOXES, 1):
        pts = np.stack([rng.uniform(x, x + w, K), rng.uniform(y, y + h, K), np.full(K, 2.0)], 1)
        pts[0, 2] = 0 if i == 1 else 2  # one unlabelled keypoint: pycocotools must skip it
        kpts[i] = [float(v) for v in pts.reshape(-1)]
    gt = _gt(BOXES, kpts)
    dets = [{**d, "keypoints": [v if j % 3 != 2 else 0.9 for j, v in enumerate(a["keypoints"])]}
            for d, a in zip(_perfect(gt), gt["annotations"], strict=True)]
    return gt, dets


def test_perfect_keypoints_score_one_with_five_keypoints() -> None:
    gt, dets = _kpt_gt()
    scores = coco_scores(gt, dets, iou_type="keypoints")
    assert scores["map50_95"] == pytest.approx(1.0)
    assert scores["ar20"] == pytest.approx(1.0)
    assert "map_small" not in scores  # COCO keypoint scoring has no small bucket


def test_moved_keypoints_score_below_one_and_wider_sigmas_forgive_more() -> None:
    gt, dets = _kpt_gt()
    for d in dets:
        d["keypoints"] = [v + 3.0 if j % 3 != 2 else v for j, v in enumerate(d["keypoints"])]
    default = coco_scores(gt, dets, iou_type="keypoints")["map50_95"]
    wide = coco_scores(gt, dets, iou_type="keypoints", oks_sigmas=[1.0] * K)["map50_95"]
    whole_box = coco_scores(gt, dets, iou_type="keypoints", oks_area_scale=1.0)["map50_95"]
    assert default < 1.0 and wide > default
    assert whole_box > default  # Ultralytics' 0.53 × box area is the stricter scale
    with pytest.raises(ValueError, match="expected 5 values"):
        coco_scores(gt, dets, iou_type="keypoints", oks_sigmas=[0.1] * 17)


def test_keypoint_ap_uses_the_same_oks_as_ultralytics() -> None:
    """One object, keypoints 10 px off: AP50-95 is the share of OKS thresholds 0.5:0.95 that Ultralytics' OKS passes."""
    import torch
    from ultralytics.utils.metrics import kpt_iou

    box = [50.0, 50.0, 40.0, 40.0]
    pts = [[50, 50, 2], [90, 50, 2], [50, 90, 2], [90, 90, 2], [70, 70, 2]]
    gt = _gt([(1, 1, box)], {1: [float(v) for p in pts for v in p]})
    det = {"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9,
           "keypoints": [float(v) for x, y, _ in pts for v in (x + 10, y, 0.9)]}
    oks = kpt_iou(torch.tensor([pts], dtype=torch.float32), torch.tensor([[[x + 10, y, 0.9] for x, y, _ in pts]]),
                  area=torch.tensor([box[2] * box[3] * 0.53]), sigma=oks_sigmas_like_ultralytics(K).tolist())
    expected = float(np.mean([float(oks) >= t for t in np.linspace(0.5, 0.95, 10)]))
    assert 0 < expected < 1  # OKS about 0.69: the test discriminates
    assert coco_scores(gt, [det], iou_type="keypoints")["map50_95"] == pytest.approx(expected)


def test_oks_sigmas_match_ultralytics_and_pycocotools() -> None:
    from pycocotools.cocoeval import Params

    np.testing.assert_allclose(oks_sigmas_like_ultralytics(17), Params("keypoints").kpt_oks_sigmas, rtol=1e-6)
    np.testing.assert_allclose(oks_sigmas_like_ultralytics(K), np.full(K, 1 / K))


# ------------------------------------------------------------------------------------------------- operating_point


def test_operating_point_counts_a_hand_made_case() -> None:
    gt = _gt([(1, 1, [0, 0, 10, 10]), (1, 1, [50, 50, 10, 10]), (2, 1, [0, 0, 10, 10])])
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "score": 0.8},  # TP (IoU 0.68)
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},  # TP, claims first: higher score
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 10, 10], "score": 0.9},  # FP: wrong class
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 10, 10], "score": 0.1},  # below conf: ignored
        {"image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},  # FP: no ground truth there
    ]
    # The 0.9 box takes GT 1; the 0.8 box then finds only GT 2 (IoU 0) free: FP. GT 2 and image 2's GT are FNs.
    op = operating_point(gt, dets, conf=0.25, iou=0.5)
    assert (op["tp"], op["fp"], op["fn"]) == (1, 3, 2)
    assert op["precision"] == pytest.approx(1 / 4)
    assert op["recall"] == pytest.approx(1 / 3)
    assert op["f1"] == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    loose = operating_point(gt, dets, conf=0.05, iou=0.5)  # the 0.1 box now counts and finds GT 2
    assert (loose["tp"], loose["fp"], loose["fn"]) == (2, 3, 1)
    assert operating_point(gt, [], conf=0.25, iou=0.5) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0,
                                                           "fp": 0, "fn": 3}


def test_operating_point_iou_threshold_decides_the_match() -> None:
    gt = _gt([(1, 1, [0, 0, 10, 10])])
    dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 0, 10, 10], "score": 0.9}]  # IoU 80/120 = 0.667
    assert operating_point(gt, dets, conf=0.25, iou=0.6)["tp"] == 1
    assert operating_point(gt, dets, conf=0.25, iou=0.7)["tp"] == 0


# ------------------------------------------------------------------------------------------- Ultralytics pipeline

COLOURS = [(230, 30, 30), (30, 30, 230)]


def _tiny_dataset(root: Path, n: int = 8, size: int = 64, train_copies: int = 0, pose: bool = False) -> Path:
    """n images with one coloured square each (red = class 0, blue = 1) scored as `val`, plus COCO GT.

    Train repeats the val images `train_copies` times (as separate files: Ultralytics de-duplicates paths). `pose`:
    one class, and the square's 4 corners and centre as K = 5 keypoints.
    """
    rng = np.random.default_rng(0)
    dirs = {d: root / d / "val" for d in ("images", "labels")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        cls = 0 if pose else i % 2
        s = int(rng.integers(20, 33))
        x, y = (int(v) for v in rng.integers(0, size - s, 2))
        im = np.full((size, size, 3), 128, np.uint8)
        im[y:y + s, x:x + s] = COLOURS[cls]
        Image.fromarray(im).save(dirs["images"] / f"{i}.png")
        label = f"{cls} {(x + s / 2) / size} {(y + s / 2) / size} {s / size} {s / size}"
        ann = {"id": i, "image_id": i, "category_id": cls + 1, "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0}
        if pose:
            pts = [(x, y), (x + s, y), (x, y + s), (x + s, y + s), (x + s / 2, y + s / 2)]
            label += "".join(f" {px / size} {py / size} 2" for px, py in pts)
            ann.update(keypoints=[v for px, py in pts for v in (px, py, 2)], num_keypoints=len(pts))
        (dirs["labels"] / f"{i}.txt").write_text(label + "\n")
        images.append({"id": i, "file_name": f"{i}.png", "width": size, "height": size})
        anns.append(ann)
    train = "images/val"
    if train_copies:
        train = "images/train"
        for d in ("images", "labels"):
            (root / d / "train").mkdir(parents=True, exist_ok=True)
            for r in range(train_copies):
                for f in dirs[d].iterdir():
                    shutil.copy(f, root / d / "train" / f"{r}_{f.name}")
    split = root / "splits" / "val.yaml"
    split.parent.mkdir(parents=True)
    data = {"path": str(root), "train": train, "val": "images/val", "names": {0: "red", 1: "blue"}}
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    if pose:
        data.update(names={0: "square"}, kpt_shape=[5, 3], flip_idx=[1, 0, 3, 2, 4])
        cats = [{"id": 1, "name": "square", "keypoints": ["tl", "tr", "bl", "br", "c"]}]
    split.write_text(yaml.safe_dump(data))
    split.with_suffix(".json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return split


def test_evaluate_split_runs_ultralytics_val_and_scores_its_predictions(tmp_path: Path) -> None:
    """Untrained model: both scores are about 0, but ids, classes and keys go through the real val pipeline."""
    split = _tiny_dataset(tmp_path / "data")
    out = evaluate_split(random_model(tmp_path / "m.pt"), split, imgsz=64)
    for key in ("map50_95", "map50", "ar100", "precision", "recall", "f1", "tp", "fp", "fn",
                "ultralytics_map50_95", "ultralytics_map50", "map50_95_minus_ultralytics"):
        assert key in out and np.isfinite(out[key]), key
    assert out["tp"] + out["fn"] == 8
    assert abs(out["map50_95_minus_ultralytics"]) <= 0.05
    dets = predict_coco(tmp_path / "m.pt", split, imgsz=64)
    assert dets and {d["image_id"] for d in dets} <= set(range(1, 9))
    assert {d["category_id"] for d in dets} <= {1, 2}


def test_evaluate_split_scores_keypoints_of_a_pose_model(tmp_path: Path) -> None:
    """Untrained K = 5 pose model: the pose val pass yields keypoints, scored as pose_* next to Ultralytics'."""
    split = _tiny_dataset(tmp_path / "data", pose=True)
    out = evaluate_split(random_model(tmp_path / "p.pt", nc=1, pose=True), split, imgsz=64)
    for key in ("map50_95", "pose_map50_95", "pose_ar20", "ultralytics_pose_map50_95",
                "pose_map50_95_minus_ultralytics"):
        assert key in out and np.isfinite(out[key]), key
    dets = predict_coco(tmp_path / "p.pt", sorted((split.parents[1] / "images" / "val").glob("*.png")), 64)
    assert dets and all(len(d["keypoints"]) == 15 for d in dets)


@pytest.mark.slow
def test_pycocotools_agrees_with_ultralytics_on_a_trained_tiny_model(tmp_path: Path) -> None:
    """Tolerance: |pycocotools mAP50-95 - Ultralytics mAP50-95| <= 0.05 on the same predictions.

    yolo11n trained from scratch for about 190 SGD steps at imgsz 64 on 8 squares (copied 32×) reaches about 0.7
    mAP50-95 here; the two scorers then differ by ~0.005 (Ultralytics interpolates its PR curve differently and
    reports 0.995 where COCO gives 1.0 at mAP50). About a minute on 2 CPU cores.
    """
    split = _tiny_dataset(tmp_path / "data", train_copies=32)
    model = YOLO("yolo11n.yaml")
    model.train(data=str(split), epochs=12, imgsz=64, batch=16, workers=0, mosaic=0.0, val=False, plots=False,
                optimizer="SGD", lr0=0.01, warmup_epochs=0, amp=False, device="cpu", seed=0, deterministic=True,
                project=str(tmp_path / "runs"), name="t", exist_ok=True, verbose=False)
    best = Path(model.trainer.best)
    out = evaluate_split(best, split, imgsz=64)
    assert out["ultralytics_map50_95"] > 0.3, "the tiny model did not learn; agreement at 0 would prove nothing"
    assert abs(out["map50_95"] - out["ultralytics_map50_95"]) <= 0.05
    assert abs(out["map50_95_minus_ultralytics"]) <= 0.05
    # predict() letterboxes each image on its own; its boxes should score about the same
    by_predict = coco_scores(split.with_suffix(".json"), predict_coco(best, sorted((split.parents[1] / "images" /
                                                                                    "val").glob("*.png")), 64))
    assert abs(by_predict["map50_95"] - out["map50_95"]) <= 0.1


def test_border_share_counts_boxes_touching_any_image_edge() -> None:
    from yolo_compress.experiments.map_agreement import border_share

    gt = {"images": [{"id": 1, "width": 100, "height": 50}],
          "annotations": [{"image_id": 1, "bbox": b} for b in ([0, 10, 5, 5], [10, 10, 5, 5], [90, 10, 10, 5],
                                                                [10, 45, 5, 5])]}
    assert border_share(gt) == 0.75
