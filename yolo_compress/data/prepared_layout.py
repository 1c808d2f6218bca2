"""The files of a prepared dataset: YOLO label rows, image checks, COCO ground truth and the metadata beside them.

Layout of a prepared root (default data/prepared)::

    images/<split>/<stem>.png    labels/<split>/<stem>.txt     (YOLO txt labels; stems are zero-padded ints)
    splits/data.yaml             Ultralytics training yaml (train/val/test), relative paths, no `path:` key
    splits/<split>.yaml          train/val/test all pointing at that split, so `val(data=...)` scores it
    splits/<split>.json          COCO ground truth; image id = int(stem), category id = class + 1
    dataset.json                 summary (see `write_metadata`)
    sources.json                 imported datasets only: {split: {stem: source image path}}

Building, validating and viewing a prepared root is yolo_compress.data.dataset; importing a user's dataset into this
layout is yolo_compress.data.user_dataset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import yaml

from yolo_compress.errors import DatasetError

SPLITS = ("train", "val", "test", "test_shift")
REQUIRED_SPLITS = ("train", "val")
SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO size buckets, in pixels of the original image
MIN_IMAGE_SIDE = 10  # Ultralytics rejects images with a side below 10 pixels
_EPS = 1e-6  # float slack for normalized coordinates written as 1.0000001
_BOX_COLS = ("cx", "cy", "w", "h")


class LabeledImage(NamedTuple):
    """One image of a split: its stem, size in pixels and label rows (class, cx, cy, w, h[, keypoints]) normalized."""

    stem: str
    width: int
    height: int
    rows: np.ndarray


# ---------------------------------------------------------------------------------------------------------- labels


def _num(v: float) -> str:
    s = f"{v:.2f}"
    return s if not 0 <= float(s) <= 1 else f"{v:.10g}"  # keep the digits that show why 1.0000003 is out


def _columns_msg(kpt_shape: Sequence[int] | None, got: int) -> str:
    if kpt_shape:
        k, d = kpt_shape
        return f"expected 5 + {k}*{d} = {5 + k * d} columns ({k} keypoints x {d}), got {got}"
    return f"expected 5 columns (class cx cy w h), got {got}"


def parse_label_file(
    path: Path, shown: str, nc: int, kpt_shape: Sequence[int] | None = None, polygons: bool = False
) -> np.ndarray:
    """Parse and check one YOLO label file; `shown` names it in errors. `polygons`: accept segment rows as boxes.

    Returns an (n, 5 + K*D) float array; raises DatasetError `shown:line: reason` on the first bad row.
    """
    ncols = 5 + (kpt_shape[0] * kpt_shape[1] if kpt_shape else 0)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetError(f"{shown}: not a UTF-8 text file; labels are lines of numbers") from None
    except OSError as err:
        raise DatasetError(f"{shown}: cannot read label file ({err.strerror})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{shown}:{lineno}"
        is_polygon = polygons and not kpt_shape and len(parts) >= 7 and len(parts) % 2 == 1
        if len(parts) != ncols and not is_polygon:
            raise DatasetError(f"{where}: {_columns_msg(kpt_shape, len(parts))}")
        vals = []
        for col, p in enumerate(parts, 1):
            try:
                v = float(p)
            except ValueError:
                raise DatasetError(f"{where}: column {col} is {p!r}, not a number") from None
            if not math.isfinite(v):
                raise DatasetError(f"{where}: column {col} is {p!r}, not a finite number")
            vals.append(v)
        cls = vals[0]
        if cls != int(cls):
            raise DatasetError(f"{where}: class id {parts[0]} is not an integer")
        if cls < 0 or cls >= nc:
            rel = "< 0" if cls < 0 else f">= nc {nc}"
            raise DatasetError(f"{where}: class id {int(cls)} {rel} (valid ids 0..{nc - 1})")
        for col in range(1, len(vals)):
            v = vals[col]
            is_visibility = kpt_shape is not None and col >= 5 and (col - 5) % kpt_shape[1] == 2
            if not is_visibility and not -_EPS <= v <= 1 + _EPS:
                name = _column_name(col, kpt_shape, is_polygon)
                raise DatasetError(f"{where}: coordinate {_num(v)} outside [0, 1] ({name})")
        if is_polygon:
            xy = np.clip(np.array(vals[1:]).reshape(-1, 2), 0, 1)
            lo, hi = xy.min(0), xy.max(0)
            vals = [cls, *((lo + hi) / 2), *(hi - lo)]
        for col in (3, 4):
            if vals[col] <= 0:
                raise DatasetError(f"{where}: box {_BOX_COLS[col - 1]} is {vals[col]:g}, must be > 0")
        if kpt_shape and kpt_shape[1] == 3:
            for j in range(kpt_shape[0]):
                vis = vals[5 + 3 * j + 2]
                if vis not in (0, 1, 2):
                    raise DatasetError(
                        f"{where}: keypoint {j} visibility {parts[5 + 3 * j + 2]} not in {{0, 1, 2}} "
                        f"(0 = not labelled, 1 = occluded, 2 = visible)"
                    )
        rows.append(vals)
    return np.array(rows, dtype=np.float64).reshape(-1, ncols)


def _column_name(col: int, kpt_shape: Sequence[int] | None, polygon: bool) -> str:
    if polygon:
        return f"column {col + 1}, polygon point {(col - 1) // 2} {'xy'[(col - 1) % 2]}"
    if col < 5:
        return f"column {col + 1}, {_BOX_COLS[col - 1]}"
    j, c = divmod(col - 5, kpt_shape[1])
    return f"column {col + 1}, keypoint {j} {'xyv'[c]}"


def label_line(row: np.ndarray, kpt_shape: Sequence[int] | None) -> str:
    parts = [str(int(row[0]))] + [f"{v:.6f}" for v in row[1:5]]
    if kpt_shape:
        d = kpt_shape[1]
        for j in range(kpt_shape[0]):
            x, y = row[5 + d * j : 7 + d * j]
            parts += [f"{x:.6f}", f"{y:.6f}"] + ([str(int(row[7 + d * j]))] if d == 3 else [])
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------- images


def decode_image(path: Path, shown: str) -> np.ndarray:
    """Decode an image like Ultralytics (BGR, EXIF-upright); DatasetError if unreadable or too small."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as err:
        raise DatasetError(f"{shown}: cannot read image ({err.strerror})") from None
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None and data.size:
        img = _decode_pil(path)
    if img is None:
        raise DatasetError(f"{shown}: corrupt image (cannot be decoded); replace or delete it")
    h, w = img.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise DatasetError(f"{shown}: image is {w}x{h} pixels, below the {MIN_IMAGE_SIDE}-pixel minimum side")
    return img


def _decode_pil(path: Path) -> np.ndarray | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception:  # noqa: BLE001 - any decoder failure means "corrupt"
        return None
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG header, without decoding (validate_layout decodes)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        raise DatasetError(f"{path}: corrupt image (cannot be decoded); replace or delete it")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


# ----------------------------------------------------------------------------------------------------- COCO + meta


def bucket(area: float) -> str:
    """COCO size bucket of a box area in pixels."""
    return "small" if area < SMALL_AREA else "medium" if area < LARGE_AREA else "large"


def coco_gt(
    images: Sequence[LabeledImage],
    names: Sequence[str],
    kpt_shape: Sequence[int] | None = None,
    kpt_names: Sequence[str] | None = None,
    skeleton: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """COCO ground truth of one split: image id = int(stem), category id = class + 1, boxes in pixels."""
    categories = []
    for i, name in enumerate(names):
        cat: dict[str, Any] = {"id": i + 1, "name": name, "supercategory": name if kpt_shape else "object"}
        if kpt_shape:
            cat["keypoints"] = list(kpt_names or [f"kpt_{j}" for j in range(kpt_shape[0])])
            cat["skeleton"] = [list(e) for e in skeleton or []]
        categories.append(cat)
    out_images, anns = [], []
    for im in sorted(images, key=lambda x: int(x.stem)):
        w, h = im.width, im.height
        out_images.append({"id": int(im.stem), "file_name": f"{im.stem}.png", "width": w, "height": h})
        for row in im.rows:
            x0, x1 = max(0.0, (row[1] - row[3] / 2) * w), min(float(w), (row[1] + row[3] / 2) * w)
            y0, y1 = max(0.0, (row[2] - row[4] / 2) * h), min(float(h), (row[2] + row[4] / 2) * h)
            bw, bh = round(x1 - x0, 3), round(y1 - y0, 3)
            ann: dict[str, Any] = {
                "id": len(anns) + 1,
                "image_id": int(im.stem),
                "category_id": int(row[0]) + 1,
                "bbox": [round(x0, 3), round(y0, 3), bw, bh],
                "area": round(bw * bh, 3),
                "iscrowd": 0,
            }
            if kpt_shape:
                k, d = kpt_shape
                kp = row[5:].reshape(k, d)
                vis = kp[:, 2] if d == 3 else np.full(k, 2.0)
                flat = []
                for (x, y), v in zip(kp[:, :2], vis, strict=True):
                    flat += [round(x * w, 3), round(y * h, 3), int(v)] if v > 0 else [0, 0, 0]
                ann["keypoints"] = flat
                ann["num_keypoints"] = int((vis > 0).sum())
            anns.append(ann)
    return {
        "info": {"description": "yolo-compress ground truth"},
        "licenses": [],
        "images": out_images,
        "annotations": anns,
        "categories": categories,
    }


def dump_json(path: Path, obj: Any, indent: int | None = None) -> None:
    text = json.dumps(obj, sort_keys=True, indent=indent, separators=(",", ": ") if indent else (",", ":"))
    path.write_text(text + "\n")


def dump_yaml(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, width=1000))


def _yaml_meta(summary: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"nc": summary["nc"], "names": list(summary["names"])}
    if summary["kpt_shape"]:
        meta["kpt_shape"] = list(summary["kpt_shape"])
        if summary["flip_idx"] is not None:
            meta["flip_idx"] = list(summary["flip_idx"])
        if summary.get("kpt_names"):  # Ultralytics form: {class id: [keypoint names]}
            meta["kpt_names"] = {i: list(summary["kpt_names"]) for i in range(summary["nc"])}
    return meta


def split_yamls(summary: dict[str, Any], prefix: str, splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{file stem: yaml dict}: 'data' for training plus one per split; image dirs are `prefix` + split."""
    meta = _yaml_meta(summary)
    train = {"train": f"{prefix}train", "val": f"{prefix}val"}
    if "test" in splits:
        train["test"] = f"{prefix}test"
    out = {"data": {**train, **meta}}
    for s in splits:
        out[s] = {"train": f"{prefix}{s}", "val": f"{prefix}{s}", "test": f"{prefix}{s}", **meta}
    return out


def scan_split(root: Path, split: str, nc: int, kpt_shape: Sequence[int] | None, decode: bool) -> list[LabeledImage]:
    """Check and read one split of a prepared root; `decode` decodes every image (else reads PNG headers)."""
    img_dir, lbl_dir = root / "images" / split, root / "labels" / split
    files = sorted(img_dir.iterdir()) if img_dir.is_dir() else []
    if not files:
        raise DatasetError(f"split '{split}' has no images in {img_dir}")
    out = []
    for p in files:
        if p.suffix != ".png" or not p.stem.isdigit():
            raise DatasetError(f"{p}: unexpected file; the prepared layout holds only <digits>.png images")
        lbl = lbl_dir / f"{p.stem}.txt"
        if not lbl.is_file():
            raise DatasetError(f"{lbl}: missing label file for image {p}; re-run prepare")
        if decode:
            h, w = decode_image(p, str(p)).shape[:2]
        else:
            w, h = _png_size(p)
        out.append(LabeledImage(p.stem, w, h, parse_label_file(lbl, str(lbl), nc, kpt_shape)))
    stems = {im.stem for im in out}
    for lbl in sorted(lbl_dir.glob("*")) if lbl_dir.is_dir() else []:
        if lbl.suffix != ".txt" or lbl.stem not in stems:
            raise DatasetError(f"{lbl}: no image {img_dir / (lbl.stem + '.png')} for this file; re-run prepare")
    return out


def count_objects(images: Sequence[LabeledImage]) -> tuple[int, dict[str, int]]:
    buckets = {"small": 0, "medium": 0, "large": 0}
    n = 0
    for im in images:
        for row in im.rows:
            buckets[bucket(row[3] * im.width * row[4] * im.height)] += 1
            n += 1
    return n, buckets


def write_metadata(
    root: Path,
    task: str,
    names: Sequence[str],
    kpt_shape: Sequence[int] | None = None,
    flip_idx: Sequence[int] | None = None,
    kpt_names: Sequence[str] | None = None,
    skeleton: Sequence[Sequence[int]] | None = None,
    source: str = "synthetic",
) -> dict[str, Any]:
    """Write splits/*.yaml, splits/*.json and dataset.json for the images and labels under `root`; return the summary.

    Summary keys: task, nc, names, kpt_shape, flip_idx, kpt_names, skeleton (null for detect), source, and per split
    `images`, `objects` and `size_buckets` ({small, medium, large} box counts by COCO area in pixels).
    """
    root = Path(root)
    splits = [s for s in SPLITS if (root / "images" / s).is_dir()]
    for s in REQUIRED_SPLITS:
        if s not in splits:
            raise DatasetError(f"split '{s}' has no images in {root / 'images' / s}")
    summary: dict[str, Any] = {
        "task": task,
        "nc": len(names),
        "names": list(names),
        "kpt_shape": list(kpt_shape) if kpt_shape else None,
        "flip_idx": list(flip_idx) if kpt_shape and flip_idx is not None else None,
        "kpt_names": list(kpt_names) if kpt_shape and kpt_names else None,
        "skeleton": [list(e) for e in skeleton] if kpt_shape and skeleton else None,
        "source": source,
        "images": {},
        "objects": {},
        "size_buckets": {},
    }
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for s in splits:
        images = scan_split(root, s, len(names), kpt_shape, decode=False)
        summary["images"][s] = len(images)
        summary["objects"][s], summary["size_buckets"][s] = count_objects(images)
        dump_json(root / "splits" / f"{s}.json", coco_gt(images, names, kpt_shape, kpt_names, skeleton))
    for stem, doc in split_yamls(summary, "../images/", splits).items():
        dump_yaml(root / "splits" / f"{stem}.yaml", doc)
    dump_json(root / "dataset.json", summary, indent=2)
    return summary


def write_split_images(root: Path, counts: Mapping[str, int],
                       draw: Callable[[str, int], tuple[np.ndarray, list[str]]]) -> None:
    """Write images/<split>/<stem>.png and labels/<split>/<stem>.txt under `root` for `counts[split]` images of each
    split; image i of a split is `draw(split, i)`: a uint8 BGR image and its YOLO label lines."""
    for split, n in counts.items():
        width = max(6, len(str(n)))
        img_dir, lbl_dir = Path(root) / "images" / split, Path(root) / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lines = draw(split, i)
            stem = f"{i + 1:0{width}d}"
            if not cv2.imwrite(str(img_dir / f"{stem}.png"), img):
                raise OSError(f"cannot write {img_dir / f'{stem}.png'}")
            (lbl_dir / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
