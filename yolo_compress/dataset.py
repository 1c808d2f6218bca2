"""The prepared dataset: build it (synthetic, digits or imported), check it, read its summary, and make training views.

The on-disk layout is described in yolo_compress.prepared_layout. Ultralytics writes `labels/<split>.cache` next to
the label folders it reads, so train and val calls go through a scratch `training_view`, never the prepared root
itself (DVC tracks it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolo_compress.config import DataConfig
from yolo_compress.errors import DatasetError
from yolo_compress.prepared_layout import (
    REQUIRED_SPLITS,
    count_objects,
    dump_yaml,
    scan_split,
    split_yamls,
    write_metadata,
)
from yolo_compress.real_scenes import DIGIT_NAMES, write_digit_scenes
from yolo_compress.synthetic import class_names, generate_synthetic, pose_layout
from yolo_compress.user_dataset import import_user_dataset

EVAL_SPLITS = ("val", "test", "test_shift")
_VIEW_MARKER = ".yolo_compress_view"


def load_summary(root: Path) -> dict[str, Any]:
    """The dataset.json summary of a prepared root."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; run the prepare stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); re-run prepare") from None


def eval_splits(requested: Sequence[str] | None, available: Sequence[str], data: str | Path) -> list[str]:
    """The splits the evaluate stage scores: `requested` (evaluate.splits), or, when None, every eval split of the
    prepared data at `data` (`available`: its split names). DatasetError names a requested split the data lacks."""
    have = [s for s in EVAL_SPLITS if s in available]
    if requested is None:
        return have
    for s in requested:
        if s not in have:
            raise DatasetError(f"evaluate.splits lists '{s}' that {data} does not have (it has {', '.join(have)}); "
                               "remove it, or set evaluate.splits: null to score every split the data has")
    return list(requested)


def validate_layout(root: Path) -> dict[str, Any]:
    """Check every image (decoded) and label of a prepared root against dataset.json; return the summary."""
    root = Path(root)
    summary = load_summary(root)
    kpt_shape = summary.get("kpt_shape")
    splits = list(summary["images"])
    on_disk = sorted(p.name for p in (root / "images").iterdir()) if (root / "images").is_dir() else []
    for s in REQUIRED_SPLITS:
        if s not in splits:
            raise DatasetError(f"split '{s}' has no images in {root / 'images' / s}")
    extra = sorted(set(on_disk) - set(splits))
    if extra:
        raise DatasetError(f"{root / 'images' / extra[0]}: split missing from {root / 'dataset.json'}; re-run prepare")
    for s in splits:
        images = scan_split(root, s, summary["nc"], kpt_shape, decode=True)
        objects, buckets = count_objects(images)
        found = {"images": len(images), "objects": objects, "size_buckets": buckets}
        for key, value in found.items():
            if summary[key].get(s) != value:
                raise DatasetError(
                    f"{root / 'dataset.json'}: {key}[{s!r}] is {summary[key].get(s)} but the files give {value}; "
                    "re-run prepare"
                )
        for name in (f"{s}.yaml", f"{s}.json"):
            if not (root / "splits" / name).is_file():
                raise DatasetError(f"{root / 'splits' / name}: missing; re-run prepare")
    if not (root / "splits" / "data.yaml").is_file():
        raise DatasetError(f"{root / 'splits' / 'data.yaml'}: missing; re-run prepare")
    return summary


# --------------------------------------------------------------------------------------------------------- prepare


def prepare_dataset(cfg: DataConfig, seed: int, root: Path) -> dict[str, Any]:
    """Build the prepared dataset for `cfg` into `root` atomically (via a `.tmp` sibling); return the summary.

    A failure leaves no `.tmp` directory and the previous `root`, if any, untouched.
    """
    root = Path(root)
    tmp, old = root.with_name(root.name + ".tmp"), root.with_name(root.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        if cfg.source == "synthetic":
            generate_synthetic(tmp, cfg, seed)
            if cfg.task == "pose":
                kpt_names, flip_idx, skeleton = pose_layout(cfg.keypoints)
                write_metadata(tmp, "pose", class_names(cfg), [cfg.keypoints, 3], flip_idx, kpt_names, skeleton)
            else:
                write_metadata(tmp, "detect", class_names(cfg))
        elif cfg.source == "digits":
            write_digit_scenes(tmp, cfg, seed)
            write_metadata(tmp, "detect", DIGIT_NAMES, source="digits")
        else:
            summary = import_user_dataset(Path(cfg.source), tmp, cfg.max_unlabeled_share)
            if summary["task"] != cfg.task:
                why = "has kpt_shape" if summary["task"] == "pose" else "has no kpt_shape"
                raise DatasetError(
                    f"data.task is '{cfg.task}' but {cfg.source} {why} (a {summary['task']} dataset); "
                    f"set data.task: {summary['task']}"
                )
        summary = validate_layout(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if root.exists():
        root.rename(old)
    tmp.rename(root)
    if old.exists():
        shutil.rmtree(old)
    return summary


# ----------------------------------------------------------------------------------------------------------- views


def training_view(root: Path, view_dir: Path, split: str | None = None) -> Path:
    """Build a scratch copy of `root` that Ultralytics may write caches into; return its yaml path.

    images/ holds per-file symlinks to the prepared images, labels/ copies of the labels. split=None gives the
    training yaml (train/val/test), a split name a yaml whose train/val/test all point at that split.
    """
    root = Path(root).resolve()
    view_dir = Path(view_dir)
    summary = load_summary(root)
    splits = list(summary["images"])
    if split is not None and split not in splits:
        raise DatasetError(f"split '{split}' not in {root / 'dataset.json'} (has {', '.join(splits)})")
    view_abs = view_dir.resolve()
    if view_abs == root or root in view_abs.parents or view_abs in root.parents:
        raise DatasetError(f"view dir {view_dir} overlaps the prepared dataset {root}; use a scratch folder")
    if view_dir.is_symlink() or view_dir.is_file():
        view_dir.unlink()
    elif view_dir.exists():
        if any(view_dir.iterdir()) and not (view_dir / _VIEW_MARKER).exists():
            raise DatasetError(f"{view_dir}: exists and is not a dataset view; refusing to delete it")
        shutil.rmtree(view_dir)
    view_dir.mkdir(parents=True)
    (view_dir / _VIEW_MARKER).write_text(f"scratch view of {root}; safe to delete\n")
    needed = [split] if split else [s for s in ("train", "val", "test") if s in splits]
    for s in needed:
        (view_dir / "images" / s).mkdir(parents=True)
        (view_dir / "labels" / s).mkdir(parents=True)
        for img in sorted((root / "images" / s).iterdir()):
            os.symlink(img, view_dir / "images" / s / img.name)
        for lbl in sorted((root / "labels" / s).iterdir()):
            shutil.copyfile(lbl, view_dir / "labels" / s / lbl.name)
        if split:  # evaluation finds the COCO ground truth beside the split yaml
            shutil.copyfile(root / "splits" / f"{s}.json", view_dir / f"{s}.json")
    name = split or "data"
    # An absolute `path:` here: the view is scratch, never tracked, and may be read from any working directory.
    doc = {"path": str(view_abs), **split_yamls(summary, "images/", needed)[name]}
    out = view_dir / f"{name}.yaml"
    dump_yaml(out, doc)
    return out
