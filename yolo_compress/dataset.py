"""The prepared dataset: on-disk layout, import and validation of Ultralytics datasets, COCO ground truth, views.

Layout of a prepared root (default data/prepared)::

    images/<split>/<stem>.png    labels/<split>/<stem>.txt     (YOLO txt labels; stems are zero-padded ints)
    splits/data.yaml             Ultralytics training yaml (train/val/test), relative paths, no `path:` key
    splits/<split>.yaml          train/val/test all pointing at that split, so `val(data=...)` scores it
    splits/<split>.json          COCO ground truth; image id = int(stem), category id = class + 1
    dataset.json                 summary (see `write_metadata`)
    sources.json                 imported datasets only: {split: {stem: source image path}}

Ultralytics writes `labels/<split>.cache` next to the label folders it reads, so train and val calls go through a
scratch `training_view`, never the prepared root itself (DVC tracks it).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import yaml

from yolo_compress.config import DataConfig
from yolo_compress.errors import DatasetError
from yolo_compress.synthetic import class_names, generate_synthetic, pose_layout

SPLITS = ("train", "val", "test", "test_shift")
EVAL_SPLITS = ("val", "test", "test_shift")
REQUIRED_SPLITS = ("train", "val")
SMALL_AREA, LARGE_AREA = 32**2, 96**2  # COCO size buckets, in pixels of the original image
MIN_IMAGE_SIDE = 10  # Ultralytics rejects images with a side below 10 pixels
_EPS = 1e-6  # float slack for normalized coordinates written as 1.0000001
_BOX_COLS = ("cx", "cy", "w", "h")
_VIEW_MARKER = ".yolo_compress_view"


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


def _label_line(row: np.ndarray, kpt_shape: Sequence[int] | None) -> str:
    parts = [str(int(row[0]))] + [f"{v:.6f}" for v in row[1:5]]
    if kpt_shape:
        d = kpt_shape[1]
        for j in range(kpt_shape[0]):
            x, y = row[5 + d * j : 7 + d * j]
            parts += [f"{x:.6f}", f"{y:.6f}"] + ([str(int(row[7 + d * j]))] if d == 3 else [])
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------- images


def _decode(path: Path, shown: str) -> np.ndarray:
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


def _dump_json(path: Path, obj: Any, indent: int | None = None) -> None:
    text = json.dumps(obj, sort_keys=True, indent=indent, separators=(",", ": ") if indent else (",", ":"))
    path.write_text(text + "\n")


def _dump_yaml(path: Path, obj: dict[str, Any]) -> None:
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


def _split_yamls(summary: dict[str, Any], prefix: str, splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{file stem: yaml dict}: 'data' for training plus one per split; image dirs are `prefix` + split."""
    meta = _yaml_meta(summary)
    train = {"train": f"{prefix}train", "val": f"{prefix}val"}
    if "test" in splits:
        train["test"] = f"{prefix}test"
    out = {"data": {**train, **meta}}
    for s in splits:
        out[s] = {"train": f"{prefix}{s}", "val": f"{prefix}{s}", "test": f"{prefix}{s}", **meta}
    return out


def _scan_split(root: Path, split: str, nc: int, kpt_shape: Sequence[int] | None, decode: bool) -> list[LabeledImage]:
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
            h, w = _decode(p, str(p)).shape[:2]
        else:
            w, h = _png_size(p)
        out.append(LabeledImage(p.stem, w, h, parse_label_file(lbl, str(lbl), nc, kpt_shape)))
    stems = {im.stem for im in out}
    for lbl in sorted(lbl_dir.glob("*")) if lbl_dir.is_dir() else []:
        if lbl.suffix != ".txt" or lbl.stem not in stems:
            raise DatasetError(f"{lbl}: no image {img_dir / (lbl.stem + '.png')} for this file; re-run prepare")
    return out


def _counts(images: Sequence[LabeledImage]) -> tuple[int, dict[str, int]]:
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
        images = _scan_split(root, s, len(names), kpt_shape, decode=False)
        summary["images"][s] = len(images)
        summary["objects"][s], summary["size_buckets"][s] = _counts(images)
        _dump_json(root / "splits" / f"{s}.json", coco_gt(images, names, kpt_shape, kpt_names, skeleton))
    for stem, doc in _split_yamls(summary, "../images/", splits).items():
        _dump_yaml(root / "splits" / f"{stem}.yaml", doc)
    _dump_json(root / "dataset.json", summary, indent=2)
    return summary


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
        images = _scan_split(root, s, summary["nc"], kpt_shape, decode=True)
        objects, buckets = _counts(images)
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


# ------------------------------------------------------------------------------------------------------ user import


@functools.cache
def _ultralytics_data_utils() -> Any:
    """`ultralytics.data.utils`: its image formats and image -> label path rule, so an import reads what training
    reads. Imported late: importing Ultralytics costs seconds that a dataset check does not need."""
    from ultralytics.data import utils

    return utils


def img2label_paths(images: Sequence[Path]) -> list[Path]:
    """Ultralytics' label path of each image: the last /images/ becomes /labels/, the suffix .txt."""
    return [Path(p) for p in _ultralytics_data_utils().img2label_paths([str(p) for p in images])]


def _is_image(p: str | Path) -> bool:
    return str(p).rpartition(".")[-1].lower() in _ultralytics_data_utils().IMG_FORMATS


def check_labels_found(data_yaml: Path, split: str, images: Sequence[Path], labels: Sequence[Path],
                       max_unlabeled_share: float) -> None:
    """DatasetError when no image of a user split has a label file (wrong layout: Ultralytics would train on nothing
    but background), or when more than `max_unlabeled_share` of them lack one. Empty label files count as labels."""
    missing = [(img, lbl) for img, lbl in zip(images, labels, strict=True) if not lbl.is_file()]
    if not missing:
        return
    img, lbl = missing[0]
    if len(missing) == len(images):
        img_dir, lbl_dir = img.parent, lbl.parent
        if img_dir == lbl_dir:
            where = f"{lbl_dir} too, since the image path has no images/ folder"
        elif not lbl_dir.is_dir():
            where = f"{lbl_dir}, which does not exist"
        else:
            where = f"{lbl_dir}, which has no <image name>.txt for any of them"
        raise DatasetError(
            f"{data_yaml}: split '{split}' has no label files: for the {len(images)} images in {img_dir} Ultralytics "
            f"reads labels from {where} (the last /images/ of an image path becomes /labels/); put images under "
            "images/<split>/ and YOLO .txt labels under labels/<split>/ beside it"
        )
    share = len(missing) / len(images)
    if share > max_unlabeled_share:
        raise DatasetError(
            f"{data_yaml}: {len(missing)} of {len(images)} images in split '{split}' ({share:.0%}) have no label file "
            f"(e.g. {lbl} for {img}), above data.max_unlabeled_share {max_unlabeled_share:g}; add the labels, or "
            "raise data.max_unlabeled_share if those images are meant as background"
        )


def _list_images(yaml_path: Path, key: str, entry: str, base: Path) -> list[Path]:
    """Images of one `train:`/`val:`... entry: a folder (searched recursively) or a .txt list, like Ultralytics."""
    p = Path(entry).expanduser()
    p = p if p.is_absolute() else base / p
    if p.is_dir():
        return sorted(x for x in p.rglob("*.*") if x.is_file() and _is_image(x))
    if not p.is_file():
        raise DatasetError(f"{yaml_path}: {key}: {p} not found (relative paths start at the dataset path {base})")
    if _is_image(p):
        return [p]
    out = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.strip()
        if not line or not _is_image(line):
            continue
        img = Path(line)
        if not img.is_absolute():
            # Ultralytics: './x' is relative to the list file, other relative paths to the working directory.
            img = p.parent / line[2:] if line.startswith("./") else img if img.exists() else p.parent / line
        if not img.is_file():
            raise DatasetError(f"{p}:{lineno}: image {img} not found")
        out.append(img)
    return sorted(out)


def _load_user_yaml(data_yaml: Path) -> dict[str, Any]:
    if data_yaml.is_dir():
        raise DatasetError(f"data.source: {data_yaml} is a folder; point it at the dataset's .yaml file")
    if not data_yaml.is_file():
        raise DatasetError(
            f"data.source: {data_yaml} not found; set data.source to 'synthetic' or to an Ultralytics dataset yaml"
        )
    try:
        data = yaml.safe_load(data_yaml.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DatasetError(f"{data_yaml}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{data_yaml}: expected a mapping with train, val and names keys")
    return data


def _user_names(data_yaml: Path, data: dict[str, Any]) -> list[str]:
    names, nc = data.get("names"), data.get("nc")
    if names is None:
        if not isinstance(nc, int) or nc < 1:
            raise DatasetError(f"{data_yaml}: 'names:' missing (a list of class names, or nc: <count>)")
        return [f"class_{i}" for i in range(nc)]
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DatasetError(f"{data_yaml}: names: keys must be class ids 0..n-1") from None
        if keys != list(range(len(names))):
            raise DatasetError(f"{data_yaml}: names: keys must be class ids 0..{len(names) - 1}, got {keys}")
        names = [names[k] if k in names else names[str(k)] for k in keys]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{data_yaml}: names: expected a non-empty list or {{id: name}} mapping")
    if nc is not None and nc != len(names):
        raise DatasetError(f"{data_yaml}: nc: {nc} does not match the {len(names)} names")
    return [str(n) for n in names]


def _user_keypoints(
    data_yaml: Path, data: dict[str, Any]
) -> tuple[list[int] | None, list[int] | None, list[str] | None]:
    kpt_shape = data.get("kpt_shape")
    if kpt_shape is None:
        return None, None, None
    ok = isinstance(kpt_shape, list) and len(kpt_shape) == 2 and all(isinstance(v, int) for v in kpt_shape)
    if not ok or kpt_shape[0] < 1 or kpt_shape[1] not in (2, 3):
        raise DatasetError(f"{data_yaml}: kpt_shape: expected [keypoints, 2 or 3], got {kpt_shape!r}")
    k = kpt_shape[0]
    flip_idx = data.get("flip_idx")
    if flip_idx is not None and (not isinstance(flip_idx, list) or sorted(flip_idx) != list(range(k))):
        raise DatasetError(f"{data_yaml}: flip_idx: expected a permutation of 0..{k - 1}, got {flip_idx!r}")
    kpt_names = data.get("kpt_names")
    if isinstance(kpt_names, dict):  # Ultralytics form: {class id: [names]}
        kpt_names = kpt_names.get(0, kpt_names.get("0"))
    if not (isinstance(kpt_names, list) and len(kpt_names) == k):
        kpt_names = None
    return kpt_shape, flip_idx, [str(n) for n in kpt_names] if kpt_names else None


def _dataset_base(data_yaml: Path, data: dict[str, Any]) -> Path:
    base = data.get("path")
    if not base:
        return data_yaml.parent
    p = Path(str(base)).expanduser()
    if p.is_absolute():
        cand = p
    else:
        cand = data_yaml.parent / p
        if not cand.exists() and p.exists():  # Ultralytics resolves against the working directory
            cand = p
    if not cand.is_dir():
        raise DatasetError(f"{data_yaml}: path: {cand} not found (a relative path starts at the yaml's folder)")
    return cand


def user_dataset_root(data_yaml: Path) -> Path:
    """The folder a user's dataset yaml resolves its images from (its `path:`, else the yaml's own folder)."""
    return _dataset_base(Path(data_yaml), _load_user_yaml(Path(data_yaml)))


def import_user_dataset(data_yaml: Path, root: Path, max_unlabeled_share: float = 0.5) -> dict[str, Any]:
    """Check a user's Ultralytics dataset and copy it into the prepared layout under `root`; return the summary.

    train and val are required, test and test_shift optional. Errors name the user's own files (`file:line`).
    A split where no image has a label file, or more than `max_unlabeled_share` of them lack one, is refused.
    Images become <stem>.png (PNGs are copied byte for byte, other formats re-encoded losslessly from the pixels
    Ultralytics would decode); labels are rewritten canonically (segment polygons become their boxes).
    """
    data_yaml = Path(data_yaml)
    data = _load_user_yaml(data_yaml)
    names = _user_names(data_yaml, data)
    kpt_shape, flip_idx, kpt_names = _user_keypoints(data_yaml, data)
    base = _dataset_base(data_yaml, data)
    listed: dict[str, list[Path]] = {}
    for split in SPLITS:
        entries = data.get(split)
        if not entries:
            if split in REQUIRED_SPLITS:
                raise DatasetError(f"{data_yaml}: '{split}:' missing; train and val are required")
            continue
        files: list[Path] = []
        for entry in entries if isinstance(entries, list) else [entries]:
            found = _list_images(data_yaml, split, str(entry), base)
            if not found:
                raise DatasetError(f"split '{split}' has no images in {base / str(entry)}")
            files += found
        listed[split] = files
    labels = {split: img2label_paths(files) for split, files in listed.items()}
    for split, files in listed.items():  # before copying anything: a wrong layout is the likeliest mistake
        check_labels_found(data_yaml, split, files, labels[split], max_unlabeled_share)
    root = Path(root)
    sources: dict[str, dict[str, str]] = {}
    for split, files in listed.items():
        img_dir, lbl_dir = root / "images" / split, root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        width = max(6, len(str(len(files))))
        sources[split] = {}
        for i, (img, lbl) in enumerate(zip(files, labels[split], strict=True)):
            stem = f"{i + 1:0{width}d}"
            rows = parse_label_file(lbl, str(lbl), len(names), kpt_shape, polygons=True) if lbl.is_file() else []
            pixels = _decode(img, str(img))
            if img.suffix.lower() == ".png":
                shutil.copyfile(img, img_dir / f"{stem}.png")
            elif not cv2.imwrite(str(img_dir / f"{stem}.png"), pixels):
                raise OSError(f"cannot write {img_dir / f'{stem}.png'}")
            (lbl_dir / f"{stem}.txt").write_text("".join(f"{_label_line(r, kpt_shape)}\n" for r in rows))
            sources[split][stem] = Path(os.path.relpath(img, base)).as_posix()
    _dump_json(root / "sources.json", sources, indent=1)
    task = "pose" if kpt_shape else "detect"
    return write_metadata(root, task, names, kpt_shape, flip_idx, kpt_names, None, source=str(data_yaml))


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
    doc = {"path": str(view_abs), **_split_yamls(summary, "images/", needed)[name]}
    out = view_dir / f"{name}.yaml"
    _dump_yaml(out, doc)
    return out
