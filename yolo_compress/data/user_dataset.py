"""Import of a user's Ultralytics dataset (its data yaml, image folders or lists, YOLO labels) into the prepared layout.

Images and labels are found the way Ultralytics finds them (its image formats and image -> label path rule), so an
import reads what training would read; errors name the user's own files.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import yaml

from yolo_compress.data.prepared_layout import (
    REQUIRED_SPLITS,
    SPLITS,
    decode_image,
    dump_json,
    label_line,
    parse_label_file,
    write_metadata,
)
from yolo_compress.errors import DatasetError


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
            f"data.source: {data_yaml} not found; set data.source to a built-in dataset (synthetic, digits) or to an "
            "Ultralytics dataset yaml under data/sources/"
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
            pixels = decode_image(img, str(img))
            if img.suffix.lower() == ".png":
                shutil.copyfile(img, img_dir / f"{stem}.png")
            elif not cv2.imwrite(str(img_dir / f"{stem}.png"), pixels):
                raise OSError(f"cannot write {img_dir / f'{stem}.png'}")
            (lbl_dir / f"{stem}.txt").write_text("".join(f"{label_line(r, kpt_shape)}\n" for r in rows))
            sources[split][stem] = Path(os.path.relpath(img, base)).as_posix()
    dump_json(root / "sources.json", sources, indent=1)
    task = "pose" if kpt_shape else "detect"
    return write_metadata(root, task, names, kpt_shape, flip_idx, kpt_names, None, source=str(data_yaml))
