"""Deterministic synthetic datasets: shapes (detect) or stick figures (pose) on textured, cluttered backgrounds.

Every image is drawn by its own numpy Generator seeded with (seed, split, index), so an image depends only on the
seed, its split and its index, and the splits are independent of each other.

detect: a class is a shape kind x fill style (20 shapes x 4 styles = 80 kinds, see `class_names`); colours are
random and never tied to the class. Objects come in all three COCO size buckets (measured in image pixels), later
objects occlude earlier ones, and clutter (lines, blobs, noise patches, unlabelled shapes of kinds outside the class
list, fragments of any kind) is drawn under and on top of them. A box is tight around the object's *visible* pixels
(as COCO boxes derived from masks); an object more than 70% hidden (by objects, clutter or the image border) is drawn
but not labelled.

pose: one class, "figure": a stick figure facing the viewer (its left side is on the image's right) with
K = cfg.keypoints joints out of 17 (`pose_layout`). Its box covers all its limbs inside the image, also the occluded
ones; keypoint visibility is 2 (visible), 1 (inside the image but covered by clutter or another figure) or 0 (outside
the image, written as 0 0 0).

test_shift uses other background families, a scale distribution shifted to small objects, and darker, lower-contrast
images; classes and label meaning are the same as in the other splits.
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import cv2
import numpy as np

from yolo_compress.config import DataConfig
from yolo_compress.data.prepared_layout import write_split_images
from yolo_compress.errors import DatasetError

# Seeds derive from these codes: never renumber them, or every dataset changes.
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "test_shift": 3}

SHAPES = (
    "circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "pentagon", "heart", "arrow",
    "crescent", "semicircle", "trapezoid", "hourglass", "saltire", "tee", "hexagram", "ellipse", "u_shape", "bar",
)  # fmt: skip
STYLES = ("solid", "outline", "striped", "split")


def _kinds() -> list[tuple[str, str]]:
    # The six most distinct kinds first, so the default `classes: 6` is the easiest set to learn.
    first = [("circle", "solid"), ("square", "solid"), ("triangle", "solid"), ("star", "solid"), ("cross", "solid")]
    first.append(("circle", "outline"))
    rest = [(s, "solid") for s in SHAPES[5:]] + [(s, "outline") for s in SHAPES[1:]]
    rest += [(s, st) for st in ("striped", "split") for s in SHAPES]
    return first + rest


KINDS = _kinds()
MAX_CLASSES = len(KINDS)  # 80


def _kind_name(shape: str, style: str) -> str:
    if (shape, style) == ("circle", "outline"):
        return "ring"
    return shape if style == "solid" else f"{shape}_{style}"


def class_names(cfg: DataConfig) -> list[str]:
    """Class names of the synthetic dataset for `cfg` (index = class id)."""
    if cfg.task == "pose":
        return ["figure"]
    if cfg.classes > MAX_CLASSES:
        raise DatasetError(f"data.classes: the synthetic generator has {MAX_CLASSES} kinds, got {cfg.classes}")
    return [_kind_name(*k) for k in KINDS[: cfg.classes]]


# ---------------------------------------------------------------------------------------------------- pose layout

JOINTS = (
    "head", "neck", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "pelvis", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "left_toe", "right_toe",
)  # fmt: skip
_PARENT = {  # kinematic tree rooted at the head, which every layout keeps
    "neck": "head", "pelvis": "neck",
    "left_shoulder": "neck", "left_elbow": "left_shoulder", "left_wrist": "left_elbow",
    "left_hip": "pelvis", "left_knee": "left_hip", "left_ankle": "left_knee", "left_toe": "left_ankle",
}  # fmt: skip
_PARENT.update({k.replace("left_", "right_"): v.replace("left_", "right_") for k, v in list(_PARENT.items())})
_CENTRE_PRIORITY = ("head", "pelvis", "neck")
_PAIR_PRIORITY = ("wrist", "ankle", "elbow", "knee", "shoulder", "hip", "toe")


def pose_layout(k: int) -> tuple[list[str], list[int], list[list[int]]]:
    """Keypoint names, flip_idx (left/right swap) and COCO skeleton (1-based index pairs) for k in 5..17 keypoints."""
    if not 5 <= k <= 17:
        raise DatasetError(f"data.keypoints: expected 5..17, got {k}")
    centres = 3 if k % 2 and k >= 7 else 1 if k % 2 else 2
    pairs = (k - centres) // 2
    chosen = set(_CENTRE_PRIORITY[:centres])
    chosen |= {f"{side}_{p}" for p in _PAIR_PRIORITY[:pairs] for side in ("left", "right")}
    names = [j for j in JOINTS if j in chosen]
    index = {n: i for i, n in enumerate(names)}
    flip_idx = [index[n.replace("left_", "#").replace("right_", "left_").replace("#", "right_")] for n in names]
    skeleton = []
    for n in names[1:]:
        parent = _PARENT[n]
        while parent not in index:  # skip joints this layout leaves out
            parent = _PARENT[parent]
        skeleton.append([index[parent] + 1, index[n] + 1])
    return names, flip_idx, skeleton


# ------------------------------------------------------------------------------------------------------ geometry


def _regular(n: int, r: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _star(n: int, inner: float) -> np.ndarray:
    pts = _regular(2 * n)
    pts[1::2] *= inner
    return pts


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    lo, hi = pts.min(0), pts.max(0)
    return (pts - (lo + hi) / 2) / ((hi - lo).max() / 2)


def _dome() -> np.ndarray:
    a = np.linspace(math.pi, 2 * math.pi, 33)
    return np.stack([np.cos(a), 1.6 * np.sin(a) + 0.8], 1)


def _rect(w: float, h: float) -> np.ndarray:
    return np.array([[-w, -h], [w, -h], [w, h], [-w, h]], float)


_ARM = 0.34
# Each shape: polygons in a unit box [-1, 1]^2 (y down); a polygon with a False flag is cut out of the ones before.
_UNIT: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_regular(64), True)],
    "square": [(_rect(0.9, 0.9), True)],
    "triangle": [(np.array([[0, -1], [1, 0.85], [-1, 0.85]], float), True)],
    "star": [(_star(5, 0.45) + [0, 0.1], True)],
    "cross": [(_rect(1, _ARM), True), (_rect(_ARM, 1), True)],
    "hexagon": [(_regular(6, 1, 0), True)],
    "diamond": [(np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], float), True)],
    "pentagon": [(_regular(5) + [0, 0.1], True)],
    "heart": [(_heart(), True)],
    "arrow": [(np.array([[0, -1], [0.85, -0.1], [0.3, -0.1], [0.3, 1], [-0.3, 1], [-0.3, -0.1], [-0.85, -0.1]]), True)],
    "crescent": [(_regular(64), True), (_regular(64, 0.8) + [0.45, 0], False)],
    "semicircle": [(_dome(), True)],
    "trapezoid": [(np.array([[-0.5, -0.7], [0.5, -0.7], [1, 0.7], [-1, 0.7]]), True)],
    "hourglass": [(np.array([[-0.8, -1], [0.8, -1], [0.12, 0], [0.8, 1], [-0.8, 1], [-0.12, 0]]), True)],
    "saltire": [(_rect(1.05, _ARM * 0.9) @ _r, True) for _r in (np.array([[1, 1], [-1, 1]]) / math.sqrt(2),
                                                                np.array([[1, -1], [1, 1]]) / math.sqrt(2))],
    "tee": [(np.array([[-1, -1], [1, -1], [1, -0.45], [0.3, -0.45], [0.3, 1], [-0.3, 1], [-0.3, -0.45],
                       [-1, -0.45]]), True)],
    "hexagram": [(_regular(3), True), (_regular(3, 1, math.pi / 2), True)],
    "ellipse": [(_regular(64) * [1, 0.5], True)],
    "u_shape": [(np.array([[-1, -1], [-0.4, -1], [-0.4, 0.35], [0.4, 0.35], [0.4, -1], [1, -1], [1, 1], [-1, 1]]),
                 True)],
    "bar": [(_rect(1, 0.32), True)],
}  # fmt: skip

_SHIFT = 4  # sub-pixel bits for cv2 drawing
_SCALE = 1 << _SHIFT


def _poly_alpha(polys: list[tuple[np.ndarray, bool]]) -> tuple[np.ndarray, int, int]:
    """Anti-aliased alpha patch (uint8) of polygons in image coordinates and the patch's top-left corner."""
    allpts = np.concatenate([p for p, _ in polys])
    x0, y0 = np.floor(allpts.min(0)).astype(int) - 2
    x1, y1 = np.ceil(allpts.max(0)).astype(int) + 3
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for pts, fill in polys:
        ipts = np.round((pts - [x0, y0]) * _SCALE).astype(np.int32)
        cv2.fillPoly(alpha, [ipts], 255 if fill else 0, cv2.LINE_AA, _SHIFT)
    return alpha, int(x0), int(y0)


def _shape_alpha(
    rng: np.random.Generator, shape: str, size: float, cx: float, cy: float
) -> tuple[np.ndarray, int, int]:
    """Alpha patch of one shape with side ~`size` px centred at (cx, cy), slightly rotated, stretched, mirrored."""
    angle = math.radians(rng.uniform(-12, 12))
    aspect = rng.uniform(0.85, 1.15)
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    polys = []
    for pts, fill in _UNIT[shape]:
        p = pts * [mirror * aspect * size / 2, size / 2] @ rot + [cx, cy]
        polys.append((p, fill))
    return _poly_alpha(polys)


def _outline(alpha: np.ndarray, size: float) -> np.ndarray:
    t = max(2, round(0.14 * size))
    inner = cv2.erode(alpha, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * t + 1, 2 * t + 1)))
    return cv2.subtract(alpha, inner)


# -------------------------------------------------------------------------------------------------------- colours


def _hsv(rng: np.random.Generator, s: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*s), rng.uniform(*v))
    return np.array([b, g, r], np.float32) * 255  # BGR like cv2


_LUMA = np.array([0.114, 0.587, 0.299], np.float32)  # BGR


def _contrast(a: np.ndarray, b: np.ndarray) -> float:
    # Luminance difference counts most: Ultralytics' HSV augmentation can wash out hue differences.
    return float(abs((a - b) @ _LUMA) + 0.35 * np.linalg.norm(a - b))


def _pick_colour(rng: np.random.Generator, against: np.ndarray, tries: int = 8) -> np.ndarray:
    best, best_c = None, -1.0
    for _ in range(tries):
        col = _hsv(rng, (0.2, 1.0), (0.15, 1.0))
        c = _contrast(col, against)
        if c > best_c:
            best, best_c = col, c
        if c >= 90:
            break
    return best


# ---------------------------------------------------------------------------------------------------- backgrounds


def _muted(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng, (0.0, 0.55), (0.25, 0.8))


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(s, dtype=np.float32), np.arange(s, dtype=np.float32))


def _blend(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    t = t[..., None]
    return c0 * (1 - t) + c1 * t


def _value_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    small = rng.random((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(small, (s, s), interpolation=cv2.INTER_CUBIC)


def _bg_gradient(rng: np.random.Generator, s: int) -> np.ndarray:
    x, y = _grid(s)
    a = rng.uniform(0, 2 * math.pi)
    t = (x * math.cos(a) + y * math.sin(a)) / s
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    return _blend(t, _muted(rng), _muted(rng))


def _bg_stripes(rng: np.random.Generator, s: int) -> np.ndarray:
    x, y = _grid(s)
    a = rng.uniform(0, math.pi)
    period = rng.uniform(6, 40) * s / 256
    t = 0.5 + 0.5 * np.sin((x * math.cos(a) + y * math.sin(a)) * 2 * math.pi / period + rng.uniform(0, 6.3))
    base = _muted(rng)
    return _blend(t, base, np.clip(base + rng.uniform(-35, 35, 3), 0, 255))


def _bg_checker(rng: np.random.Generator, s: int) -> np.ndarray:
    x, y = _grid(s)
    cell = rng.uniform(6, 40) * s / 256
    t = ((x // cell + y // cell) % 2).astype(np.float32)
    base = _muted(rng)
    return _blend(t, base, np.clip(base + rng.uniform(-35, 35, 3), 0, 255))


def _bg_blobs(rng: np.random.Generator, s: int) -> np.ndarray:
    img = np.empty((s, s, 3), np.float32)
    img[:] = _muted(rng)
    for _ in range(rng.integers(5, 13)):
        centre = tuple(int(v) for v in rng.integers(0, s, 2))
        axes = tuple(int(v) for v in rng.integers(s // 16, s // 4, 2))
        cv2.ellipse(img, centre, axes, rng.uniform(0, 180), 0, 360, _muted(rng).tolist(), -1)
    return cv2.GaussianBlur(img, (0, 0), s / rng.uniform(12, 25))


def _bg_noise(rng: np.random.Generator, s: int) -> np.ndarray:
    img = np.empty((s, s, 3), np.float32)
    img[:] = _muted(rng)
    img += rng.normal(0, rng.uniform(6, 14), (s, s, 3)).astype(np.float32)
    return cv2.GaussianBlur(img, (0, 0), rng.uniform(0.8, 2.0))


def _bg_clouds(rng: np.random.Generator, s: int) -> np.ndarray:
    t = _value_noise(rng, s, int(rng.integers(3, 7))) + 0.5 * _value_noise(rng, s, int(rng.integers(8, 16)))
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    return _blend(t, _muted(rng), _muted(rng))


def _bg_rings(rng: np.random.Generator, s: int) -> np.ndarray:
    x, y = _grid(s)
    cx, cy = rng.uniform(-0.3, 1.3, 2) * s
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    t = 0.5 + 0.5 * np.sin(r * 2 * math.pi / (rng.uniform(8, 30) * s / 256))
    base = _muted(rng)
    return _blend(t, base, np.clip(base + rng.uniform(-55, 55, 3), 0, 255))


def _bg_marble(rng: np.random.Generator, s: int) -> np.ndarray:
    x, y = _grid(s)
    a = rng.uniform(0, math.pi)
    turb = _value_noise(rng, s, int(rng.integers(3, 8))) * rng.uniform(4, 10)
    u = (x * math.cos(a) + y * math.sin(a)) * 2 * math.pi / (rng.uniform(20, 60) * s / 256)
    t = 0.5 + 0.5 * np.sin(u + turb)
    return _blend(t, _muted(rng), _muted(rng))


def _bg_dots(rng: np.random.Generator, s: int) -> np.ndarray:
    img = np.empty((s, s, 3), np.float32)
    base = _muted(rng)
    img[:] = base
    dot = np.clip(base + rng.uniform(-50, 50, 3), 0, 255).tolist()
    cell = max(4, int(rng.uniform(8, 24) * s / 256))
    r = max(1, int(cell * rng.uniform(0.15, 0.35)))
    for yy in range(cell // 2, s, cell):
        off = cell // 2 if (yy // cell) % 2 else 0
        for xx in range(cell // 2 + off, s, cell):
            cv2.circle(img, (xx, yy), r, dot, -1)
    return img


def _bg_bricks(rng: np.random.Generator, s: int) -> np.ndarray:
    img = np.empty((s, s, 3), np.float32)
    mortar = _muted(rng)
    img[:] = mortar
    base = _muted(rng)
    h = max(4, int(rng.uniform(10, 28) * s / 256))
    w = 2 * h
    gap = max(1, h // 8)
    for row, yy in enumerate(range(0, s, h)):
        for xx in range(-(w // 2) * (row % 2), s, w):
            col = np.clip(base + rng.uniform(-15, 15, 3), 0, 255).tolist()
            cv2.rectangle(img, (xx + gap, yy + gap), (xx + w - gap, yy + h - gap), col, -1)
    return img


_FAMILY_A = (_bg_gradient, _bg_stripes, _bg_checker, _bg_blobs, _bg_noise)
_FAMILY_B = (_bg_clouds, _bg_rings, _bg_marble, _bg_dots, _bg_bricks)


def _background(rng: np.random.Generator, s: int, shift: bool) -> np.ndarray:
    family = _FAMILY_B if shift else _FAMILY_A
    # No sensor grain on top: it doubles the PNG size; the noise family covers noisy backgrounds.
    return family[int(rng.integers(len(family)))](rng, s)


# ---------------------------------------------------------------------------------------------------- compositing


def _paste(
    canvas: np.ndarray, owner: np.ndarray | None, alpha: np.ndarray, x0: int, y0: int, colour: np.ndarray, oid: int
) -> None:
    """Alpha-blend `colour` (BGR, or a patch like `alpha`) into `canvas`; mark opaque pixels as `oid` in `owner`."""
    s = canvas.shape[0]
    h, w = alpha.shape
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(s, x0 + w), min(s, y0 + h)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    a = alpha[sl]
    af = a[..., None].astype(np.float32) * (1 / 255)
    col = colour if colour.ndim == 1 else colour[sl]
    region = canvas[cy0:cy1, cx0:cx1]
    region += (col - region) * af
    if owner is not None:
        owner[cy0:cy1, cx0:cx1][a >= 128] = oid


def _region(alpha: np.ndarray, x0: int, y0: int, s: int) -> tuple[slice, slice, slice, slice] | None:
    """Slices (image rows, image cols, patch rows, patch cols) of a patch's part inside the image."""
    h, w = alpha.shape
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(s, x0 + w), min(s, y0 + h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return slice(cy0, cy1), slice(cx0, cx1), slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)


def _mean_under(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> np.ndarray:
    r = _region(alpha, x0, y0, canvas.shape[0])
    if r is None:
        return canvas.mean((0, 1))
    m = alpha[r[2], r[3]] >= 128
    px = canvas[r[0], r[1]][m]
    return px.mean(0) if len(px) else canvas.mean((0, 1))


def _overlap(owner: np.ndarray, alpha: np.ndarray, x0: int, y0: int) -> float:
    r = _region(alpha, x0, y0, owner.shape[0])
    if r is None:
        return 1.0
    m = alpha[r[2], r[3]] >= 128
    return float((owner[r[0], r[1]][m] >= 0).sum()) / max(1, int((alpha >= 128).sum()))


# -------------------------------------------------------------------------------------------------------- clutter


def _blob_alpha(rng: np.random.Generator, cx: float, cy: float, r: float) -> tuple[np.ndarray, int, int]:
    n = int(rng.integers(10, 17))
    radii = r * rng.uniform(0.55, 1.3, n)
    radii = (radii + np.roll(radii, 1) + np.roll(radii, -1)) / 3  # smooth: irregular but not spiky
    pts = _regular(n, 1.0, rng.uniform(0, 6.3)) * radii[:, None] + [cx, cy]
    return _poly_alpha([(pts, True)])


def _line_alpha(rng: np.random.Generator, s: int, thickness: int) -> tuple[np.ndarray, int, int]:
    alpha = np.zeros((s, s), np.uint8)
    pts = np.round(rng.uniform(-0.1, 1.1, (int(rng.integers(2, 5)), 2)) * s * _SCALE).astype(np.int32)
    cv2.polylines(alpha, [pts], False, 255, thickness, cv2.LINE_AA, _SHIFT)
    return alpha, 0, 0


def _clutter(rng: np.random.Generator, s: int, extra_kinds: list[tuple[str, str]], pose: bool) -> tuple:
    """One distractor: (alpha, x0, y0, colour or None for 'pick a contrasting colour')."""
    choices = ["line", "blob", "noise", "fragment"] + (["shape", "shape"] if extra_kinds else [])
    choices += ["stick", "stick"] if pose else []
    kind = choices[int(rng.integers(len(choices)))]
    cx, cy = rng.uniform(0, s, 2)
    if kind == "line":
        return (*_line_alpha(rng, s, int(rng.integers(1, max(2, s // 64) + 1))), None)
    if kind == "stick":  # limb-like thick polyline, so that "thick stroke" alone does not mean "figure"
        alpha = np.zeros((s, s), np.uint8)
        length = rng.uniform(0.05, 0.2) * s
        pts = [np.array([cx, cy])]
        for _ in range(int(rng.integers(1, 3))):
            a = rng.uniform(0, 2 * math.pi)
            pts.append(pts[-1] + length * np.array([math.cos(a), math.sin(a)]))
        ipts = np.round(np.array(pts) * _SCALE).astype(np.int32)
        cv2.polylines(alpha, [ipts], False, 255, max(2, round(length * 0.15)), cv2.LINE_AA, _SHIFT)
        return alpha, 0, 0, None
    if kind == "blob":
        return (*_blob_alpha(rng, cx, cy, rng.uniform(0.02, 0.12) * s), None)
    if kind == "noise":
        w, h = (rng.uniform(0.04, 0.15, 2) * s).astype(int) + 2
        x0, y0 = int(cx - w / 2), int(cy - h / 2)
        patch = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
        return np.full((h, w), 255, np.uint8), x0, y0, patch
    size = math.exp(rng.uniform(math.log(max(12.0, 0.05 * s)), math.log(0.35 * s)))
    if kind == "shape":  # a kind outside the class list: an unlabelled hard negative
        shape, style = extra_kinds[int(rng.integers(len(extra_kinds)))]
        alpha, x0, y0 = _shape_alpha(rng, shape, size, cx, cy)
        return (_outline(alpha, size) if style == "outline" else alpha), x0, y0, None
    # fragment: at most ~20% of a shape of any kind, cut by a random straight edge
    alpha, x0, y0 = _shape_alpha(rng, SHAPES[int(rng.integers(len(SHAPES)))], size, cx, cy)
    yy, xx = np.nonzero(alpha >= 128)
    if len(yy) == 0:
        return alpha, x0, y0, None
    a = rng.uniform(0, 2 * math.pi)
    d = xx * math.cos(a) + yy * math.sin(a)
    keep = d > np.quantile(d, 0.8)
    frag = np.zeros_like(alpha)
    frag[yy[keep], xx[keep]] = 255
    return frag, x0, y0, None


def _draw_clutter(
    rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray | None, extra: list, pose: bool
) -> None:
    alpha, x0, y0, colour = _clutter(rng, canvas.shape[0], extra, pose)
    if colour is None:
        colour = _pick_colour(rng, _mean_under(canvas, alpha, x0, y0), tries=3)
    _paste(canvas, owner, alpha, x0, y0, colour, -1)


# ---------------------------------------------------------------------------------------------------- detect images

# Never unlabelled distractors: a circle cut by the border or by another object looks like a semicircle or crescent,
# a cut square like a bar, a cut triangle like a trapezoid.
_LOOKALIKES = {"semicircle", "crescent", "bar", "trapezoid"}
_BUCKET_SIDES = ((12.0, 30.0), (34.0, 92.0), (100.0, math.inf))  # px: COCO small / medium / large
_BUCKET_P = {False: (0.25, 0.45, 0.3), True: (0.55, 0.35, 0.1)}  # test_shift favours small objects


def _object_side(rng: np.random.Generator, s: int, shift: bool) -> float:
    smax = 0.62 * s
    ranges = [(lo, min(hi, smax)) for lo, hi in _BUCKET_SIDES if lo < smax]
    p = np.array(_BUCKET_P[shift][: len(ranges)])
    lo, hi = ranges[int(rng.choice(len(ranges), p=p / p.sum()))]
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _style_colour(
    rng: np.random.Generator, style: str, alpha: np.ndarray, x0: int, y0: int, size: float, base: np.ndarray
) -> np.ndarray:
    """Per-pixel colour patch of a striped or split object (two contrasting colours)."""
    other = base
    for _ in range(8):
        other = _hsv(rng, (0.2, 1.0), (0.15, 1.0))
        if _contrast(other, base) >= 90:
            break
    rows = np.arange(alpha.shape[0], dtype=np.float32)[:, None]
    if style == "striped":
        period = max(4.0, size / 4)
        second = ((rows + y0) // (period / 2)) % 2 == 1
    else:  # split: top half one colour, bottom half the other (survives horizontal flips)
        ys = np.nonzero(alpha.max(1) >= 128)[0]
        second = rows >= (ys.min() + ys.max()) / 2 if len(ys) else rows < 0
    patch = np.empty((*alpha.shape, 3), np.float32)
    patch[:] = base
    patch[np.broadcast_to(second, alpha.shape)] = other
    return patch


def _detect_image(rng: np.random.Generator, cfg: DataConfig, shift: bool) -> tuple[np.ndarray, list[str]]:
    s = cfg.image_size
    canvas = _background(rng, s, shift)
    owner = np.full((s, s), -1, np.int16)
    used = {shape for shape, _ in KINDS[: cfg.classes]}
    extra = [k for k in KINDS if k[0] not in used | _LOOKALIKES]  # distractor kinds: silhouettes no class has
    n_clutter = int(rng.integers(1, 5))
    on_top = rng.random(n_clutter) < 0.15
    for _ in range(int((~on_top).sum())):
        _draw_clutter(rng, canvas, None, extra, False)
    objects = []
    for i in range(int(rng.integers(1, cfg.max_objects + 1))):
        cls = int(rng.integers(cfg.classes))
        shape, style = KINDS[cls]
        size = _object_side(rng, s, shift)
        best = None
        for _ in range(4):  # a few placements to keep occlusion partial, not total
            cx, cy = rng.uniform(0, s, 2)
            alpha, x0, y0 = _shape_alpha(rng, shape, size, cx, cy)
            ov = _overlap(owner, alpha, x0, y0)
            if best is None or ov < best[0]:
                best = (ov, alpha, x0, y0)
            if ov < 0.35:
                break
        _, alpha, x0, y0 = best
        if style == "outline":
            alpha = _outline(alpha, size)
        colour = _pick_colour(rng, _mean_under(canvas, alpha, x0, y0))
        if style in ("striped", "split"):
            colour = _style_colour(rng, style, alpha, x0, y0, size, colour)
        _paste(canvas, owner, alpha, x0, y0, colour, i)
        objects.append((cls, alpha, x0, y0))
    for _ in range(int(on_top.sum())):
        _draw_clutter(rng, canvas, owner, extra, False)
    if shift:
        canvas = _photometric_shift(rng, canvas)
    lines = []
    for i, (cls, alpha, x0, y0) in enumerate(objects):
        r = _region(alpha, x0, y0, s)
        total = int((alpha >= 128).sum())
        if r is None or total == 0:
            continue
        vis = owner[r[0], r[1]] == i
        if vis.sum() < 0.3 * total:
            continue
        ys, xs = np.nonzero(vis)
        bx0, by0 = xs.min() + r[1].start, ys.min() + r[0].start
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        if min(bw, bh) < 2:
            continue
        lines.append(f"{cls} {(bx0 + bw / 2) / s:.6f} {(by0 + bh / 2) / s:.6f} {bw / s:.6f} {bh / s:.6f}")
    return canvas, lines


def _photometric_shift(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    contrast = rng.uniform(0.65, 0.85)
    return (canvas - 128) * contrast + 128 - rng.uniform(15, 45)


# ------------------------------------------------------------------------------------------------------ pose images


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _figure_joints(rng: np.random.Generator, pelvis: np.ndarray, t: float) -> dict[str, np.ndarray]:
    """All 17 joints of a figure facing the viewer with torso length `t` (its left side on the image's right)."""
    phi = math.radians(float(np.clip(rng.normal(0, 12), -30, 30)))
    up = np.array([math.sin(phi), -math.cos(phi)])
    side = np.array([math.cos(phi), math.sin(phi)])  # towards the figure's left
    j = {"pelvis": pelvis, "neck": pelvis + t * up}
    j["head"] = j["neck"] + 0.42 * t * up
    for sign, lr in ((1, "left"), (-1, "right")):
        out = sign * side
        j[f"{lr}_shoulder"] = j["neck"] + 0.38 * t * out
        j[f"{lr}_hip"] = pelvis + 0.22 * t * out
        a = math.radians(rng.uniform(10, 170))  # 10 = arm hanging, 170 = raised
        upper = math.cos(a) * -up + math.sin(a) * out
        j[f"{lr}_elbow"] = j[f"{lr}_shoulder"] + 0.55 * t * upper
        j[f"{lr}_wrist"] = j[f"{lr}_elbow"] + 0.5 * t * _rot(upper, rng.choice([-1, 1]) * rng.uniform(0, 140))
        a = math.radians(rng.uniform(-10, 50))
        thigh = math.cos(a) * -up + math.sin(a) * out
        j[f"{lr}_knee"] = j[f"{lr}_hip"] + 0.6 * t * thigh
        j[f"{lr}_ankle"] = j[f"{lr}_knee"] + 0.55 * t * _rot(thigh, rng.choice([-1, 1]) * rng.uniform(0, 100))
        j[f"{lr}_toe"] = j[f"{lr}_ankle"] + 0.22 * t * _rot(out, -sign * rng.uniform(0, 30))
    return j


_LIMBS = [("head", "neck"), ("neck", "pelvis")] + [
    (a.replace("L", lr), b.replace("L", lr))
    for lr in ("left", "right")
    for a, b in (("neck", "L_shoulder"), ("L_shoulder", "L_elbow"), ("L_elbow", "L_wrist"), ("pelvis", "L_hip"),
                 ("L_hip", "L_knee"), ("L_knee", "L_ankle"), ("L_ankle", "L_toe"))
]  # fmt: skip


def _figure_alpha(joints: dict[str, np.ndarray], t: float) -> tuple[np.ndarray, int, int]:
    pts = np.array(list(joints.values()))
    pad = 0.3 * t + 4
    x0, y0 = np.floor(pts.min(0) - pad).astype(int)
    x1, y1 = np.ceil(pts.max(0) + pad).astype(int)
    alpha = np.zeros((y1 - y0, x1 - x0), np.uint8)
    thick = max(2, round(0.13 * t))

    def ip(p: np.ndarray) -> tuple[int, int]:
        q = np.round((p - [x0, y0]) * _SCALE).astype(int)
        return int(q[0]), int(q[1])

    for a, b in _LIMBS:
        w = round(thick * 1.5) if (a, b) == ("neck", "pelvis") else thick
        cv2.line(alpha, ip(joints[a]), ip(joints[b]), 255, w, cv2.LINE_AA, _SHIFT)
    cv2.circle(alpha, ip(joints["head"]), round(0.26 * t * _SCALE), 255, -1, cv2.LINE_AA, _SHIFT)
    for p in joints.values():  # joint discs: the pixel under each keypoint belongs to the figure
        cv2.circle(alpha, ip(p), round(max(1.5, 0.6 * thick) * _SCALE), 255, -1, cv2.LINE_AA, _SHIFT)
    return alpha, int(x0), int(y0)


def _pose_image(
    rng: np.random.Generator, cfg: DataConfig, shift: bool, kpt_names: list[str]
) -> tuple[np.ndarray, list[str]]:
    s = cfg.image_size
    canvas = _background(rng, s, shift)
    owner = np.full((s, s), -1, np.int16)
    n_clutter = int(rng.integers(2, 7))
    on_top = rng.random(n_clutter) < 0.2
    for _ in range(int((~on_top).sum())):
        _draw_clutter(rng, canvas, None, [], True)
    lo, hi = (0.035, 0.13) if shift else (0.045, 0.2)
    figures = []
    for i in range(int(rng.integers(1, min(cfg.max_objects, 4) + 1))):
        t = math.exp(rng.uniform(math.log(max(5.0, lo * s)), math.log(hi * s)))
        best = None
        for _ in range(4):
            pelvis = rng.uniform([0.05 * s, 0.15 * s], [0.95 * s, 0.95 * s])
            joints = _figure_joints(rng, pelvis, t)
            alpha, x0, y0 = _figure_alpha(joints, t)
            ov = _overlap(owner, alpha, x0, y0)
            if best is None or ov < best[0]:
                best = (ov, joints, alpha, x0, y0)
            if ov < 0.3:
                break
        _, joints, alpha, x0, y0 = best
        _paste(canvas, owner, alpha, x0, y0, _pick_colour(rng, _mean_under(canvas, alpha, x0, y0)), i)
        figures.append((joints, alpha, x0, y0, t))
    for joints, _, _, _, t in figures:  # occluders placed on joints, so some keypoints are hidden (v=1)
        if rng.random() < 0.4:
            name = kpt_names[int(rng.integers(len(kpt_names)))]
            alpha, x0, y0 = _blob_alpha(rng, *(joints[name] + rng.normal(0, 0.1 * t, 2)), rng.uniform(0.25, 0.5) * t)
            _paste(canvas, owner, alpha, x0, y0, _pick_colour(rng, _mean_under(canvas, alpha, x0, y0), 3), -1)
    for _ in range(int(on_top.sum())):
        _draw_clutter(rng, canvas, owner, [], True)
    if shift:
        canvas = _photometric_shift(rng, canvas)
    lines = []
    for i, (joints, alpha, x0, y0, _) in enumerate(figures):
        r = _region(alpha, x0, y0, s)
        total = int((alpha >= 128).sum())
        if r is None or (owner[r[0], r[1]] == i).sum() < 0.3 * total:
            continue
        ys, xs = np.nonzero(alpha[r[2], r[3]] >= 128)
        bx0, by0 = xs.min() + r[1].start, ys.min() + r[0].start
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        kpts = []
        for name in kpt_names:
            x, y = joints[name]
            if not (0 <= x < s and 0 <= y < s):
                kpts.append("0.000000 0.000000 0")
                continue
            v = 2 if owner[int(y), int(x)] == i else 1
            kpts.append(f"{x / s:.6f} {y / s:.6f} {v}")
        box = f"{(bx0 + bw / 2) / s:.6f} {(by0 + bh / 2) / s:.6f} {bw / s:.6f} {bh / s:.6f}"
        lines.append(f"0 {box} {' '.join(kpts)}")
    return canvas, lines


# -------------------------------------------------------------------------------------------------------- writing


def generate_synthetic(root: Path, cfg: DataConfig, seed: int) -> None:
    """Write images/<split>/<stem>.png and labels/<split>/<stem>.txt for the four splits under `root`."""
    class_names(cfg)  # rejects an unsupported class count before anything is written
    kpt_names = pose_layout(cfg.keypoints)[0] if cfg.task == "pose" else []

    def draw(split: str, i: int) -> tuple[np.ndarray, list[str]]:
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        shift = split == "test_shift"
        if cfg.task == "pose":
            canvas, lines = _pose_image(rng, cfg, shift, kpt_names)
        else:
            canvas, lines = _detect_image(rng, cfg, shift)
        return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), lines

    write_split_images(root, {split: int(getattr(cfg, f"{split}_images")) for split in SPLIT_CODES}, draw)
