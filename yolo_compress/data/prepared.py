"""Reading the prepared dataset: its dataset.json summary, the splits evaluate scores, and training views.

Ultralytics writes `labels/<split>.cache` next to the label folders it reads, so train and val calls go through a
scratch `training_view`, never the prepared root itself (DVC tracks it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolo_compress.data.prepared_layout import dump_yaml, split_yamls
from yolo_compress.errors import DatasetError

__all__ = ["EVAL_SPLITS", "eval_splits", "load_summary", "training_view"]

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
