"""Bootstrap intervals of pycocotools' mAP50-95: resample a split's images, score each resample, read the spread.

pycocotools evaluates every image once (`COCOeval.evaluate`: per image and class, which detections match which
ground truth at each IoU threshold). A resample only changes how often each image counts, so its mAP is
`accumulate`'s arithmetic (sort by score, cumulate true and false positives, interpolate precision at 101 recall
points) with each detection and ground truth weighted by its image's count. `image_weights` draws the counts once
per split from a fixed seed, so two models scored on the same split share their resamples and the difference of
their samples is a paired bootstrap of the difference.

Only the headline number is resampled: mAP50-95 over all areas at 100 detections per image, the AP that
`COCOeval.summarize` reports first. With every weight 1 it equals that AP (a test holds it to pycocotools').
"""

from __future__ import annotations

import contextlib
import io
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yolo_compress.measure.evaluation import load_gt

__all__ = ["BOOTSTRAP_SAMPLES", "PerImage", "image_weights", "interval", "interval_keys", "map_samples",
           "per_image_eval", "resampled_map"]

BOOTSTRAP_SAMPLES = 1000  # resamples per split: the 2.5% and 97.5% quantiles rest on 25 samples each
_CHUNK = 200  # resamples scored at once (memory: chunk x detections of one class, a few arrays of it)


@dataclass(frozen=True)
class _ClassEval:
    """One class's detections in score order, and its non-ignored ground truth per image."""

    det_image: np.ndarray  # (D,) index of each detection's image
    tp: np.ndarray  # (T, D) matched at each IoU threshold, and not ignored
    fp: np.ndarray  # (T, D) unmatched, and not ignored
    gt_per_image: np.ndarray  # (I,) non-ignored ground-truth boxes per image


@dataclass(frozen=True)
class PerImage:
    """pycocotools' per-image evaluation of one split, reduced to what mAP50-95 needs."""

    image_ids: list[int]
    classes: list[_ClassEval]  # the classes with ground truth (others have no AP)
    recall_thresholds: np.ndarray  # (R,) pycocotools' 101 points


def per_image_eval(gt: dict[str, Any], detections: Iterable[dict[str, Any]]) -> PerImage:
    """Run pycocotools' per-image matching on `gt` (a COCO dict with annotations) and box `detections`."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dets = [dict(d) for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(gt)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.areaRng, ev.params.areaRngLbl = [ev.params.areaRng[0]], ["all"]  # only the headline AP's
        ev.evaluate()
    p = ev.params
    images, n_area, max_det = list(p.imgIds), len(p.areaRng), p.maxDets[-1]
    classes = []
    for k in range(len(p.catIds)):
        evals = [(i, ev.evalImgs[k * n_area * len(images) + i]) for i in range(len(images))]
        evals = [(i, e) for i, e in evals if e is not None]
        gt_count = np.zeros(len(images))
        for i, e in evals:
            gt_count[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        if not gt_count.any():
            continue
        scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for _, e in evals] or [np.zeros(0)])
        order = np.argsort(-scores, kind="mergesort")  # pycocotools' own order, ties included
        det_image = np.concatenate([np.full(min(len(e["dtScores"]), max_det), i) for i, e in evals] or
                                   [np.zeros(0, int)])[order].astype(int)
        t = len(p.iouThrs)
        matched = np.concatenate([e["dtMatches"][:, :max_det] for _, e in evals] or [np.zeros((t, 0))], axis=1)
        ignored = np.concatenate([e["dtIgnore"][:, :max_det] for _, e in evals] or [np.zeros((t, 0))], axis=1)
        matched, ignored = matched[:, order].astype(bool), ignored[:, order].astype(bool)
        classes.append(_ClassEval(det_image, matched & ~ignored, ~matched & ~ignored, gt_count))
    return PerImage(images, classes, np.asarray(p.recThrs))


def _empty_results(gt: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
    empty.createIndex()
    return empty


def image_weights(n_images: int, split: str, samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """(samples, n_images) counts of each image in each resample, the same for every model of `split`."""
    rng = np.random.default_rng(zlib.crc32(split.encode()))
    draws = rng.integers(0, n_images, size=(samples, n_images))
    return np.stack([np.bincount(row, minlength=n_images) for row in draws]).astype(float)


def resampled_map(evals: PerImage, weights: np.ndarray) -> np.ndarray:
    """mAP50-95 of each resample (rows of `weights`, one count per image of `evals`)."""
    weights = np.atleast_2d(weights)
    total = np.zeros(len(weights))
    count = np.zeros(len(weights))
    for c in evals.classes:
        for lo in range(0, len(weights), _CHUNK):
            ap_sum, n = _class_ap(c, weights[lo:lo + _CHUNK], evals.recall_thresholds)
            total[lo:lo + _CHUNK] += ap_sum
            count[lo:lo + _CHUNK] += n
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _class_ap(c: _ClassEval, w: np.ndarray, rec_thrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample: the sum over IoU thresholds of this class's interpolated AP, and how many thresholds count.

    Only the true positives' positions matter: recall rises only there, so the first position reaching a recall
    threshold is one, and a false positive's precision is below the true positive before it, so the precision
    envelope's maxima are theirs too. Each IoU threshold thus costs resamples x its true positives, not x every
    detection, and one cumulated count of the detections seen serves all thresholds.
    """
    b, t = len(w), c.tp.shape[0]
    n_gt = w @ c.gt_per_image  # (B,)
    valid = n_gt > 0  # a resample without this class's ground truth has no AP for it (pycocotools' -1)
    wd = w[:, c.det_image]  # (B, D): each detection weighted by its image's count
    counted = c.tp | c.fp  # not ignored
    seen_all = np.cumsum(wd, axis=1) if counted.all() else None  # the usual case: no detection ignored
    ap = np.zeros(b)
    for k in range(t):
        pos = np.flatnonzero(c.tp[k])
        if pos.size == 0:
            continue  # no match at this IoU: AP 0
        seen = (seen_all if seen_all is not None else np.cumsum(wd * counted[k], axis=1))[:, pos]
        tp = np.cumsum(wd[:, pos], axis=1)  # (B, P)
        rc = tp / np.where(valid, n_gt, 1)[:, None]  # float64 as pycocotools: 7 / 10 lands on its 0.7 threshold
        pr = np.maximum.accumulate((tp / (seen + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]  # precision envelope
        at = np.stack([np.searchsorted(row, rec_thrs, side="left") for row in rc])  # (B, R), as accumulate does
        q = np.where(at < pos.size, np.take_along_axis(pr, np.minimum(at, pos.size - 1), axis=1), 0.0)
        ap += q.mean(axis=1)
    return np.where(valid, ap, 0.0), np.where(valid, t, 0)


def map_samples(gt_json: str | Path, detections: Iterable[dict[str, Any]], split: str,
                samples: int = BOOTSTRAP_SAMPLES) -> np.ndarray:
    """mAP50-95 of `detections` on each of `split`'s resamples (the same resamples for every model of the split)."""
    gt, _ = load_gt(gt_json)
    evals = per_image_eval(gt, detections)
    return resampled_map(evals, image_weights(len(evals.image_ids), split, samples))


def interval_keys(key: str, samples: np.ndarray) -> dict[str, float]:
    """`interval(samples)` as metrics keys: `<key>_std`, `<key>_ci95_low`, `<key>_ci95_high`."""
    return {f"{key}_{k}": v for k, v in interval(samples).items()}


def paired_keys(key: str, point: float, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """`key`: `point` (a's score minus b's on the whole split) and the paired interval of that difference, from
    samples `a` and `b` of the same resamples."""
    return {key: point, **interval_keys(key, a - b)}


def interval(samples: np.ndarray) -> dict[str, float]:
    """std and 95% percentile interval of bootstrap samples (NaN samples, with no ground truth, left out)."""
    s = samples[~np.isnan(samples)]
    if s.size == 0:
        return {}
    low, high = np.percentile(s, [2.5, 97.5])
    return {"std": float(s.std(ddof=1)) if s.size > 1 else 0.0, "ci95_low": float(low), "ci95_high": float(high)}
