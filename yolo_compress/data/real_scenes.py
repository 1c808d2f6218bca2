"""The `digits` dataset: detection scenes built from real images that ship inside scikit-learn (no download).

Objects are the 1797 handwritten digit scans of `sklearn.datasets.load_digits()` (8x8 grayscale, 10 classes named
"0".."9"); backgrounds are crops of the two photographs of `sklearn.datasets.load_sample_images()`.

A digit is upscaled bilinearly and its ink intensity becomes the alpha mask of a solid colour or of a photo-texture
patch pushed to the other side of the background's brightness, so the object's shape is the real handwriting. Its
YOLO box is the tight box of its visible mask pixels. Sizes are drawn per COCO area bucket (small < 32^2, medium,
large > 96^2 px at the image size); placements that overlap an earlier box by more than `_MAX_OVERLAP` are retried.

The 1797 samples are split per class into four disjoint pools first (train 60%, val, test, test_shift 13.3% each),
so no handwriting sample of train appears in another split. test_shift shifts the distribution: backgrounds from the
other photo (flower.jpg; the other splits use china.jpg), sizes skewed to small objects, and darker, lower-contrast
images. Every image depends only on (seed, split, index), like the synthetic generator's.

Detect only: DataConfig refuses data.task: pose with this source. data.classes is ignored (always the 10 digits).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from yolo_compress.config import DataConfig
from yolo_compress.data.prepared_layout import write_split_images
from yolo_compress.data.synthetic import SPLIT_CODES

DIGIT_NAMES = [str(d) for d in range(10)]
_STREAM = 1797  # seeds are (seed, _STREAM, ...): never equal to a synthetic image's (seed, split, index)
_POOL_SHARE = {"train": 0.6, "val": 0.4 / 3, "test": 0.4 / 3}  # test_shift takes the rest
_PHOTO = {"train": "china.jpg", "val": "china.jpg", "test": "china.jpg", "test_shift": "flower.jpg"}
_BUCKET_AREAS = ((144.0, 900.0), (1300.0, 8000.0), (10500.0, math.inf))  # px^2: COCO small / medium / large
_BUCKET_P = {False: (0.3, 0.45, 0.25), True: (0.55, 0.35, 0.1)}  # test_shift favours small objects
_MAX_OVERLAP = 0.15  # most of the smaller box another box may cover
_MIN_VISIBLE = 0.5  # an object less visible than this (only by rare overlap) is drawn but not labelled
_LUMA = np.array([0.114, 0.587, 0.299], np.float32)  # BGR


class Collection(NamedTuple):
    digits: np.ndarray  # (1797, 8, 8) float32 ink in [0, 1]
    targets: np.ndarray  # (1797,) int class ids
    photos: dict[str, np.ndarray]  # file name -> BGR uint8 photograph


class Placed(NamedTuple):
    sample: int  # index into Collection.digits
    x0: int  # top-left corner of `alpha` in the image
    y0: int
    alpha: np.ndarray  # float32 in [0, 1]; 0 leaves the background untouched


def load_collection() -> Collection:
    """The digits and photographs bundled with scikit-learn."""
    # late import: scikit-learn takes a second to import, and only prepare with data.source: digits needs it
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    photos = load_sample_images()
    pairs = zip(photos.filenames, photos.images, strict=True)
    named = {Path(f).name: np.ascontiguousarray(im[:, :, ::-1]) for f, im in pairs}  # RGB -> BGR, as cv2 writes
    return Collection(digits.images.astype(np.float32) / 16, digits.target.astype(int), named)


# ------------------------------------------------------------------------------------------- geometry (pure)


def split_samples(targets: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Disjoint sample indices per split, drawn per class so that every split holds every digit."""
    rng = np.random.default_rng([seed, _STREAM, 99])
    pools: dict[str, list[int]] = {s: [] for s in SPLIT_CODES}
    for cls in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        start = 0
        for split, share in _POOL_SHARE.items():
            n = round(share * len(idx))
            pools[split] += idx[start:start + n].tolist()
            start += n
        pools["test_shift"] += idx[start:].tolist()
    return {s: np.array(sorted(v)) for s, v in pools.items()}


def _ink(digit: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(digit > 0)
    return digit[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def object_hw(rng: np.random.Generator, s: int, shift: bool, ink_shape: tuple[int, int]) -> tuple[float, float]:
    """Height and width of a digit's ink in image pixels: an area drawn in one COCO bucket, the ink's aspect kept."""
    rows, cols = ink_shape
    # the alpha patch adds one source pixel of fade on each side; keep the whole patch within 0.8 of the image
    hmax, wmax = 0.8 * s * rows / (rows + 2), 0.8 * s * cols / (cols + 2)
    aspect = cols / rows
    amax = min(hmax * hmax * aspect, wmax * wmax / aspect)
    ranges = [(lo, min(hi, amax)) for lo, hi in _BUCKET_AREAS if lo < amax]
    p = np.array(_BUCKET_P[shift][:len(ranges)]) if ranges else np.ones(1)
    lo, hi = ranges[int(rng.choice(len(ranges), p=p / p.sum()))] if ranges else (amax / 4, amax)
    area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    h = math.sqrt(area / aspect)
    return h, max(2.0, h * aspect)


def digit_alpha(digit: np.ndarray, h: float, w: float) -> np.ndarray:
    """Alpha mask of `digit` (8x8 ink in [0, 1]) with its ink scaled to about h x w pixels (bilinear)."""
    ink = np.pad(_ink(digit), 1)  # zero border: the mask fades out instead of ending on a cut edge
    fy, fx = h / (ink.shape[0] - 2), w / (ink.shape[1] - 2)
    size = (max(3, round(ink.shape[1] * fx)), max(3, round(ink.shape[0] * fy)))
    up = cv2.resize(ink, size, interpolation=cv2.INTER_LINEAR)
    # faint anti-aliasing from the 4x4 block counts is no ink: exactly 0 there keeps the box tight; 8-bit steps so
    # that every pixel inside the mask visibly changes
    return (np.round(np.clip((up - 0.2) / 0.3, 0, 1) * 255) / 255).astype(np.float32)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the True pixels, x1/y1 exclusive; None when there are none."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _cover(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def plan_scene(rng: np.random.Generator, s: int, max_objects: int, shift: bool, pool: np.ndarray,
               digits: np.ndarray, tries: int = 8) -> list[Placed]:
    """Up to `max_objects` digits from `pool`, each inside the image and overlapping earlier boxes only a little."""
    placed: list[Placed] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        sample = int(pool[rng.integers(len(pool))])
        alpha = digit_alpha(digits[sample], *object_hw(rng, s, shift, _ink(digits[sample]).shape))
        local = tight_box(alpha > 0)
        if local is None:
            continue
        for _ in range(tries):
            x0, y0 = int(rng.integers(0, s - alpha.shape[1] + 1)), int(rng.integers(0, s - alpha.shape[0] + 1))
            box = (local[0] + x0, local[1] + y0, local[2] + x0, local[3] + y0)
            if all(_cover(box, b) <= _MAX_OVERLAP for b in boxes):
                placed.append(Placed(sample, x0, y0, alpha))
                boxes.append(box)
                break
    return placed


def visible_boxes(plan: list[Placed], s: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(plan index, tight box of its visible mask) per labelled object; later objects cover earlier ones."""
    owner = np.full((s, s), -1, np.int32)
    for i, p in enumerate(plan):
        h, w = p.alpha.shape
        owner[p.y0:p.y0 + h, p.x0:p.x0 + w][p.alpha > 0] = i
    out = []
    for i, p in enumerate(plan):
        h, w = p.alpha.shape
        vis = owner[p.y0:p.y0 + h, p.x0:p.x0 + w] == i
        box = tight_box(vis)
        if box is None or vis.sum() < _MIN_VISIBLE * (p.alpha > 0).sum():
            continue
        out.append((i, (box[0] + p.x0, box[1] + p.y0, box[2] + p.x0, box[3] + p.y0)))
    return out


def yolo_lines(plan: list[Placed], targets: np.ndarray, s: int) -> list[str]:
    """YOLO detect label lines (class cx cy w h, normalised) for the visible objects of `plan`."""
    lines = []
    for i, (x0, y0, x1, y1) in visible_boxes(plan, s):
        cls = int(targets[plan[i].sample])
        lines.append(f"{cls} {(x0 + x1) / 2 / s:.6f} {(y0 + y1) / 2 / s:.6f} {(x1 - x0) / s:.6f} {(y1 - y0) / s:.6f}")
    return lines


# ------------------------------------------------------------------------------------------- pixels (pure)


def _crop(rng: np.random.Generator, photo: np.ndarray, h: int, w: int, min_share: float) -> np.ndarray:
    """A random crop of `photo` covering at least `min_share` of its short side, resized to h x w, maybe flipped."""
    ph, pw = photo.shape[:2]
    side = rng.uniform(min_share, 1.0) * min(ph, pw)
    ch, cw = (side, side * w / h) if w <= h else (side * h / w, side)
    ch, cw = max(2, min(ph, round(ch))), max(2, min(pw, round(cw)))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    patch = cv2.resize(photo[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR)
    return patch[:, ::-1] if rng.random() < 0.5 else patch


def background(rng: np.random.Generator, photo: np.ndarray, s: int) -> np.ndarray:
    """An s x s float32 BGR crop of `photo` with random position, scale, flip and brightness."""
    return np.clip(_crop(rng, photo, s, s, 0.3).astype(np.float32) * rng.uniform(0.7, 1.25), 0, 255)


def _to_luma(patch: np.ndarray, target: float) -> np.ndarray:
    """`patch` moved linearly towards black or white so that its mean luma is `target`."""
    luma = float((patch * _LUMA).sum(-1).mean())
    if target <= luma:
        return patch * (target / max(luma, 1e-3))
    return 255 - (255 - patch) * ((255 - target) / max(255 - luma, 1e-3))


def paint(rng: np.random.Generator, canvas: np.ndarray, photo: np.ndarray, plan: list[Placed]) -> np.ndarray:
    """`canvas` with each planned digit blended in: a solid colour or a photo texture, contrasting with what is under
    it. Pixels where every alpha is 0 keep their exact value."""
    out = canvas.copy()
    for p in plan:
        h, w = p.alpha.shape
        region = out[p.y0:p.y0 + h, p.x0:p.x0 + w]
        under = float((region[p.alpha > 0] * _LUMA).sum(-1).mean())
        target = rng.uniform(5, 70) if under > 128 else rng.uniform(185, 250)
        if rng.random() < 0.5:
            fill = np.broadcast_to(rng.uniform(0, 255, 3).astype(np.float32), (h, w, 3))
        else:
            fill = _crop(rng, photo, h, w, 0.1).astype(np.float32)
        a = p.alpha[..., None]
        region[:] = region * (1 - a) + _to_luma(fill, target) * a
    return out


def compose_scene(rng: np.random.Generator, cfg: DataConfig, shift: bool, photo: np.ndarray, pool: np.ndarray,
                  col: Collection) -> tuple[np.ndarray, list[str]]:
    """One uint8 BGR image and its YOLO label lines."""
    s = cfg.image_size
    canvas = background(rng, photo, s)
    plan = plan_scene(rng, s, cfg.max_objects, shift, pool, col.digits)
    canvas = paint(rng, canvas, photo, plan)
    if shift:  # darker, lower contrast
        canvas = (canvas - 128) * rng.uniform(0.6, 0.8) + 128 - rng.uniform(10, 35)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), yolo_lines(plan, col.targets, s)


# ------------------------------------------------------------------------------------------------ writing


def write_digit_scenes(root: Path, cfg: DataConfig, seed: int) -> None:
    """Write images/<split>/<stem>.png and labels/<split>/<stem>.txt for the four splits under `root`."""
    col = load_collection()
    pools = split_samples(col.targets, seed)

    def draw(split: str, i: int) -> tuple[np.ndarray, list[str]]:
        rng = np.random.default_rng([seed, _STREAM, SPLIT_CODES[split], i])
        return compose_scene(rng, cfg, split == "test_shift", col.photos[_PHOTO[split]], pools[split], col)

    write_split_images(root, {split: int(getattr(cfg, f"{split}_images")) for split in SPLIT_CODES}, draw)
