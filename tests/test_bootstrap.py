"""Bootstrap intervals of pycocotools' mAP50-95: exact at unit weights, paired across models, fast enough."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from yolo_compress.measure.bootstrap import (
    BOOTSTRAP_SAMPLES,
    image_weights,
    interval,
    map_samples,
    paired_keys,
    per_image_eval,
    resampled_map,
)
from yolo_compress.measure.evaluation import coco_scores, load_gt


def make_split(seed: int, n_images: int = 60, miss: float = 0.2, noise: float = 4.0) -> tuple[dict, list[dict]]:
    """Ground truth of a few classes and detections near it (some missed, some wrong class), plus clutter."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": 256, "height": 256, "file_name": f"{i}.jpg"} for i in range(n_images)]
    anns, dets = [], []
    for i in range(n_images):
        for _ in range(rng.integers(0, 6)):
            c, (x, y), (w, h) = int(rng.integers(0, 4)), rng.uniform(0, 200, 2), rng.uniform(5, 60, 2)
            anns.append({"image_id": i, "category_id": c, "bbox": [x, y, w, h]})
            if rng.random() > miss:
                j = rng.normal(0, noise, 4)
                dets.append({"image_id": i, "category_id": c if rng.random() > 0.1 else int(rng.integers(0, 4)),
                             "bbox": [x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3])],
                             "score": float(rng.random())})
        for _ in range(rng.integers(0, 10)):
            dets.append({"image_id": i, "category_id": int(rng.integers(0, 4)),
                         "bbox": [float(v) for v in rng.uniform(1, 100, 4)], "score": float(rng.random() * 0.5)})
    return {"images": images, "annotations": anns, "categories": [{"id": c} for c in range(4)]}, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_give_pycocotools_map(seed: int) -> None:
    gt, dets = make_split(seed)
    evals = per_image_eval(load_gt(gt)[0], dets)
    ours = resampled_map(evals, np.ones(len(evals.image_ids)))[0]
    assert ours == pytest.approx(coco_scores(gt, dets)["map50_95"], rel=1e-6)


def test_a_duplicated_image_counts_twice() -> None:
    # weight 2 on an image is the split with that image copied: the same detections and boxes, under new ids
    gt, dets = make_split(3, n_images=10)
    n = len(gt["images"])
    first = [{**a, "image_id": n} for a in gt["annotations"] if a["image_id"] == 0]
    copy_gt = {**gt, "images": gt["images"] + [{**gt["images"][0], "id": n}], "annotations": gt["annotations"] + first}
    copy_dets = dets + [{**d, "image_id": n} for d in dets if d["image_id"] == 0]
    weights = np.ones(n)
    weights[0] = 2
    ours = resampled_map(per_image_eval(load_gt(gt)[0], dets), weights)[0]
    assert ours == pytest.approx(coco_scores(copy_gt, copy_dets)["map50_95"], abs=2e-3)  # ties may order apart


def test_resamples_are_shared_per_split_and_pairing_narrows_the_interval(tmp_path: Path) -> None:
    gt, dets = make_split(4)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    assert np.array_equal(image_weights(60, "test"), image_weights(60, "test"))
    assert not np.array_equal(image_weights(60, "test"), image_weights(60, "val"))
    a = map_samples(path, dets, "test")
    # a second model: the same detections with slightly perturbed scores, so the two are strongly correlated
    rng = np.random.default_rng(5)
    b = map_samples(path, [{**d, "score": d["score"] * float(rng.uniform(0.9, 1.0))} for d in dets], "test")
    alone, paired = interval(a), paired_keys("gain", 0.0, a, b)
    assert alone["ci95_low"] < coco_scores(gt, dets)["map50_95"] < alone["ci95_high"]
    assert paired["gain_ci95_high"] - paired["gain_ci95_low"] < (alone["ci95_high"] - alone["ci95_low"]) / 3
    same = paired_keys("same", 0.0, a, a)
    assert same["same_ci95_low"] == same["same_ci95_high"] == 0.0


def test_a_thousand_resamples_take_seconds() -> None:
    gt, dets = make_split(6, n_images=100)
    evals = per_image_eval(load_gt(gt)[0], dets)
    start = time.perf_counter()
    samples = resampled_map(evals, image_weights(100, "test"))
    assert samples.shape == (BOOTSTRAP_SAMPLES,) and not np.isnan(samples).any()
    assert time.perf_counter() - start < 30  # a generous bound for a loaded CI machine; about 1 s alone
