"""The built-in `digits` dataset (yolo_compress/data/real_scenes.py): real handwriting on real photos, made offline."""

from __future__ import annotations

import dataclasses
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from yolo_compress.config import DataConfig, Params, load_params
from yolo_compress.data.dataset import prepare_dataset, validate_layout
from yolo_compress.data.inputs import check_tracked, user_files
from yolo_compress.data.prepared_layout import bucket
from yolo_compress.data.real_scenes import (
    DIGIT_NAMES,
    background,
    load_collection,
    paint,
    plan_scene,
    split_samples,
    visible_boxes,
    yolo_lines,
)
from yolo_compress.errors import ParamsError

SPLITS = ("train", "val", "test", "test_shift")
TINY = DataConfig(source="digits", image_size=96, max_objects=3, train_images=4, val_images=2, test_images=2,
                  test_shift_images=3)


@pytest.fixture(scope="module")
def collection():
    return load_collection()


def labels(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "labels").rglob("*.txt"))}


def test_prepare_writes_a_valid_layout_with_ten_classes_and_is_deterministic(tmp_path: Path) -> None:
    summary = prepare_dataset(TINY, 0, tmp_path / "a")
    assert summary["task"] == "detect" and summary["source"] == "digits"
    assert summary["nc"] == 10 and summary["names"] == DIGIT_NAMES == [str(d) for d in range(10)]
    assert summary["images"] == {"train": 4, "val": 2, "test": 2, "test_shift": 3}
    assert all(summary["objects"][s] >= summary["images"][s] for s in SPLITS)  # every scene has a digit
    assert validate_layout(tmp_path / "a") == summary
    assert (tmp_path / "a" / "images" / "test_shift" / "000003.png").is_file()

    prepare_dataset(TINY, 0, tmp_path / "b")
    prepare_dataset(TINY, 1, tmp_path / "c")
    first = labels(tmp_path / "a")
    assert len(first) == 11 and first == labels(tmp_path / "b")
    same_images = [(tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
                   for f in ("images/train/000001.png", "images/test_shift/000002.png")]
    assert all(same_images)
    assert first.keys() == labels(tmp_path / "c").keys() and first != labels(tmp_path / "c")


def test_box_is_the_tight_box_of_the_pixels_the_digit_changed(collection) -> None:
    s = 128
    pool = split_samples(collection.targets, 0)["train"]
    photo = collection.photos["china.jpg"]
    for i in range(5):
        rng = np.random.default_rng([7, i])
        bg = background(rng, photo, s)
        plan = plan_scene(rng, s, 1, False, pool, collection.digits)
        canvas = paint(rng, bg, photo, plan)
        ys, xs = np.nonzero(np.any(canvas != bg, axis=-1))
        [(_, box)] = visible_boxes(plan, s)
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert 0 <= box[0] < box[2] <= s and 0 <= box[1] < box[3] <= s
        [line] = yolo_lines(plan, collection.targets, s)
        cls, cx, cy, w, h = line.split()
        assert int(cls) == collection.targets[plan[0].sample]
        assert np.allclose([float(cx) * s, float(cy) * s, float(w) * s, float(h) * s],
                           [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]], atol=1e-3)


def test_sizes_cover_all_coco_buckets_and_test_shift_favours_small(collection) -> None:
    pools = split_samples(collection.targets, 0)
    counts = {}
    for shift in (False, True):
        areas = []
        for i in range(40):
            plan = plan_scene(np.random.default_rng([3, int(shift), i]), 256, 8, shift, pools["val"], collection.digits)
            areas += [(b[2] - b[0]) * (b[3] - b[1]) for _, b in visible_boxes(plan, 256)]
        counts[shift] = {k: sum(bucket(a) == k for a in areas) / len(areas) for k in ("small", "medium", "large")}
    assert all(share > 0.05 for share in counts[False].values()), counts
    assert counts[True]["small"] > counts[False]["small"] + 0.1, counts


def test_digit_samples_are_split_into_disjoint_pools_with_every_class(collection) -> None:
    pools = split_samples(collection.targets, 0)
    for a, b in combinations(SPLITS, 2):
        assert not set(pools[a]) & set(pools[b]), (a, b)
    assert sorted(np.concatenate(list(pools.values()))) == list(range(1797))
    for s in SPLITS:
        assert set(collection.targets[pools[s]]) == set(range(10)), s
    assert len(pools["train"]) > 1000
    plan = plan_scene(np.random.default_rng(0), 256, 50, False, pools["test"], collection.digits)
    assert {p.sample for p in plan} <= set(pools["test"])
    assert not np.array_equal(split_samples(collection.targets, 1)["train"], pools["train"])


def test_pose_with_digits_is_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  source: digits\n  task: pose\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    msg = str(err.value)
    assert "\n" not in msg and f"{path}: data.task: expected detect when data.source is digits" in msg


def test_digits_is_built_in_and_names_no_file(tmp_path: Path) -> None:
    params = dataclasses.replace(Params(), data=DataConfig(source="digits"))
    assert user_files(params, tmp_path) == []
    check_tracked(params, tmp_path)  # no data/sources/digits needed
