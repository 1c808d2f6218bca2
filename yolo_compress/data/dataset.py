"""The prepared dataset: build it (synthetic, digits or imported) and check it. Reading it is `data.prepared`.

The on-disk layout is described in yolo_compress.data.prepared_layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from yolo_compress.config import DataConfig
from yolo_compress.data.prepared import load_summary
from yolo_compress.data.prepared_layout import (
    REQUIRED_SPLITS,
    count_objects,
    scan_split,
    write_metadata,
)
from yolo_compress.data.real_scenes import DIGIT_NAMES, write_digit_scenes
from yolo_compress.data.synthetic import class_names, generate_synthetic, pose_layout
from yolo_compress.data.user_dataset import import_user_dataset
from yolo_compress.errors import DatasetError


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
