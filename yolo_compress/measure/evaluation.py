"""COCO-style scoring with pycocotools, next to Ultralytics' own val mAP for the same model and split.

Ground truth is a prepared split's `splits/<split>.json` (image id = int(file stem), category id = class + 1), which
is also how Ultralytics names images and classes in its predictions JSON for non-COCO data, so the two score
against each other directly.

Empty size buckets: pycocotools reports -1 when a split has no ground truth of a size (e.g. no large objects). Such
keys are left out of the result rather than stored as -1 (it would drag every average and difference down) or NaN
(DVC shows it poorly and JSON has no NaN); a missing `map_large` means "no large objects in this split".
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torchvision.ops import box_iou

from yolo_compress.errors import DatasetError, ModelError
from yolo_compress.files import read_json
from yolo_compress.models import YOLO, load_model

__all__ = [
    "BOX_KEYS",
    "exported_task",
    "map_lost",
    "KPT_KEYS",
    "ULTRALYTICS_OKS_AREA_SCALE",
    "gt_json_for",
    "predict_coco",
    "coco_scores",
    "oks_sigmas_like_ultralytics",
    "operating_point",
    "val_predictions",
    "evaluate_split",
    "evaluate_split_with_predictions",
]

# pycocotools' summarize() stats, in order, under our key names.
BOX_KEYS = ("map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
            "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")
# Keypoint stats: no small bucket, and recall is at most 20 detections per image (ar20 = AR@[.5:.95], ar50/ar75 at
# OKS 0.5/0.75).
KPT_KEYS = ("map50_95", "map50", "map75", "map_medium", "map_large", "ar20", "ar50", "ar75", "ar_medium", "ar_large")

# Detections kept per image, over all classes: COCO's rule for its benchmark (and the maxDets=100 its AP counts).
# Ultralytics keeps 300; on the default test split 100 moved mAP50-95 by under 0.001 and cut scoring time by ~30%.
MAX_DETECTIONS = 100

# Ultralytics' pose validator scales OKS by 0.53 × the box area (COCO person area over box area, after xtcocotools);
# our ground truth stores the box area, so keypoint scoring applies the same factor to be comparable.
ULTRALYTICS_OKS_AREA_SCALE = 0.53

Gt = dict[str, Any]
Detections = list[dict[str, Any]]


def gt_json_for(split_yaml: str | Path) -> Path:
    """The COCO ground truth beside a split yaml (`splits/val.yaml` -> `splits/val.json`); DatasetError if missing."""
    gt = Path(split_yaml).with_suffix(".json")
    if not gt.is_file():
        raise DatasetError(f"{gt}: not found, so {Path(split_yaml).name} is an eval split without ground truth; "
                           "rerun the prepare stage (dvc repro prepare) or score only splits it prepared")
    return gt


# --------------------------------------------------------------------------------------------------- predictions


def _validator_capturing(base: type, sink: Detections) -> type:
    """A validator class that keeps its COCO predictions and skips Ultralytics' own JSON file and scoring.

    That scoring needs faster-coco-eval, which Ultralytics would try to pip-install (offline: a warning per run). The
    file is written with `json.dump` (Python's slow encoder): ~30 s of the default evaluate stage, for a file nobody
    reads. Emptying `jdict` once the metrics are final skips both.
    """

    class _Capture(base):  # type: ignore[misc, valid-type]
        def finalize_metrics(self) -> None:
            super().finalize_metrics()
            sink.extend(self.jdict)
            self.jdict = []

    return _Capture


def exported_task(path: str | Path) -> str:
    """The task Ultralytics' metadata gives an exported file (YOLO(x.onnx) needs it given): inside an .onnx file,
    or in the metadata.yaml of an OpenVINO folder."""
    path = Path(path)
    try:
        if path.is_dir():
            meta = yaml.safe_load((path / "metadata.yaml").read_text()) or {}
        else:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others for a broken file
        raise ModelError(f"{path}: not a readable exported file ({type(err).__name__}); rerun `dvc repro export`") \
            from None
    return str(meta.get("task", "detect"))


def _load_scored(model_path: str | Path) -> YOLO:
    """A .pt/.yaml through load_model; an exported .onnx file (ONNX Runtime) or OpenVINO folder through
    Ultralytics' AutoBackend."""
    if str(model_path).endswith(".onnx") or Path(model_path).is_dir():
        return YOLO(str(model_path), task=exported_task(model_path))
    return load_model(model_path, "model")


def val_predictions(
    model_pt: str | Path,
    split_yaml: str | Path,
    imgsz: int,
    conf: float = 0.001,
    iou: float = 0.7,
    batch: int = 16,
    device: str | None = None,
    split: str = "val",
) -> tuple[Detections, dict[str, float]]:
    """One Ultralytics val pass: its COCO predictions (as in predictions.json) and its own mAPs.

    The split yaml scores the split through its `split` key (`val`). Ultralytics' keys: `map50_95`, `map50`, plus
    `pose_map50_95`, `pose_map50` for pose models. `model_pt` may be an exported .onnx (fixed batch 1: Ultralytics
    then validates one image at a time, letterboxed to `imgsz` as the graph expects).
    """
    model = _load_scored(model_pt)
    sink: Detections = []
    validator = _validator_capturing(model.task_map[model.task]["validator"], sink)
    with tempfile.TemporaryDirectory(prefix="yc-val-") as tmp:  # val always writes a run folder; keep it out of cwd
        metrics = model.val(
            validator=validator, data=str(split_yaml), split=split, imgsz=imgsz, conf=conf, iou=iou, batch=batch,
            max_det=MAX_DETECTIONS, save_json=True, plots=False, verbose=False, project=tmp, name="val", exist_ok=True,
            **({"device": device} if device is not None else {}),
        )
    scores = {"map50_95": float(metrics.box.map), "map50": float(metrics.box.map50)}
    if model.task == "pose":
        scores.update(pose_map50_95=float(metrics.pose.map), pose_map50=float(metrics.pose.map50))
    return sink, scores


def _image_id(path: str | Path) -> int:
    stem = Path(path).stem
    if not stem.isdigit():
        raise DatasetError(f"{path}: image file names must be integers (COCO image id = int(file stem)); "
                           "rename the images or prepare the dataset with the prepare stage")
    return int(stem)


def _predict_images(model: YOLO, images: Sequence[Path], imgsz: int, conf: float, iou: float,
                    device: str | None) -> Detections:
    dets: Detections = []
    for r in model.predict([str(p) for p in images], imgsz=imgsz, conf=conf, iou=iou, max_det=MAX_DETECTIONS,
                           stream=True, verbose=False, **({"device": device} if device is not None else {})):
        image_id = _image_id(r.path)
        xyxy = r.boxes.xyxy.cpu().numpy()
        kpts = r.keypoints.data.cpu().numpy() if r.keypoints is not None else None
        for i, (box, score, cls) in enumerate(zip(xyxy, r.boxes.conf.tolist(), r.boxes.cls.tolist(), strict=True)):
            x0, y0, x1, y1 = (float(v) for v in box)
            det = {"image_id": image_id, "category_id": int(cls) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                   "score": float(score)}
            if kpts is not None:
                k = kpts[i]
                if k.shape[1] == 2:  # (x, y) only: mark every keypoint visible
                    k = np.concatenate([k, np.ones((len(k), 1), k.dtype)], 1)
                det["keypoints"] = [float(v) for v in k.reshape(-1)]
            dets.append(det)
    return dets


def predict_coco(
    model_pt: str | Path,
    images: str | Path | Sequence[str | Path],
    imgsz: int,
    conf: float = 0.001,
    iou: float = 0.7,
    device: str | None = None,
) -> Detections:
    """COCO detections [{image_id, category_id, bbox [x,y,w,h], score (, keypoints)}] of a model.

    `images` is a split yaml (scored by Ultralytics val, so the predictions are exactly the ones behind its own mAP)
    or a list of image files named `<int id>.<ext>` (scored by predict). The low default `conf` is for mAP.
    """
    if isinstance(images, (str, Path)) and str(images).endswith((".yaml", ".yml")):
        return val_predictions(model_pt, images, imgsz, conf=conf, iou=iou, device=device)[0]
    if isinstance(images, (str, Path)):
        images = [images]
    return _predict_images(load_model(model_pt, "model"), [Path(p) for p in images], imgsz, conf, iou, device)


# ------------------------------------------------------------------------------------------------------- scoring


def load_gt(gt_json: str | Path | Gt) -> tuple[Gt, str]:
    """A copy of the ground truth with the fields pycocotools needs filled in, and its name for messages."""
    if isinstance(gt_json, dict):
        gt, name = copy.deepcopy(gt_json), "ground truth"
    else:
        gt, name = read_json(gt_json), str(gt_json)
    for i, ann in enumerate(gt.get("annotations", []), 1):
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        if "keypoints" in ann:
            ann.setdefault("num_keypoints", int(sum(v > 0 for v in ann["keypoints"][2::3])))
    gt.setdefault("categories", [{"id": c} for c in sorted({a["category_id"] for a in gt.get("annotations", [])})])
    return gt, name


def _num_keypoints(gt: Gt) -> int:
    for ann in gt.get("annotations", []):
        if ann.get("keypoints"):
            return len(ann["keypoints"]) // 3
    for cat in gt.get("categories", []):
        if cat.get("keypoints"):
            return len(cat["keypoints"])
    raise DatasetError("keypoint scoring needs ground truth with 'keypoints' in its annotations or categories; "
                       "score this split with iou_type='bbox'")


def oks_sigmas_like_ultralytics(num_keypoints: int) -> np.ndarray:
    """Ultralytics' OKS sigmas: COCO's 17 person sigmas for K = 17, else 1/K each (its pose validator's default)."""
    if num_keypoints == 17:
        from ultralytics.utils.metrics import OKS_SIGMA

        return np.asarray(OKS_SIGMA, dtype=np.float64)
    return np.full(num_keypoints, 1.0 / num_keypoints)


def coco_scores(
    gt_json: str | Path | Gt,
    detections: Iterable[dict[str, Any]],
    iou_type: str = "bbox",
    oks_sigmas: Sequence[float] | None = None,
    oks_area_scale: float = ULTRALYTICS_OKS_AREA_SCALE,
) -> dict[str, float]:
    """pycocotools COCOeval as {map50_95, map50, ...} (BOX_KEYS, or KPT_KEYS for iou_type='keypoints').

    Size buckets without ground truth are left out (see the module docstring). For keypoints, OKS sigmas and the
    ground-truth area scale (`oks_area_scale` × the stored area; 1.0 for real COCO segment areas) default to
    Ultralytics' choices so the numbers compare with its pose mAP. pycocotools' printing is swallowed.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "keypoints"):
        raise ValueError(f"iou_type must be 'bbox' or 'keypoints', got {iou_type!r}")
    gt, name = load_gt(gt_json)
    dets = [dict(d) for d in detections]  # loadRes adds id/area/segmentation to each dict: keep the caller's intact
    if not gt.get("annotations"):
        raise DatasetError(f"{name}: no annotated objects, so AP is undefined; score a split that has labels")
    if iou_type == "keypoints":
        k = _num_keypoints(gt)
        sigmas = np.asarray(oks_sigmas if oks_sigmas is not None else oks_sigmas_like_ultralytics(k), np.float64)
        if sigmas.shape != (k,):
            raise ValueError(f"oks_sigmas: expected {k} values (one per keypoint), got {sigmas.size}")
        if dets and "keypoints" not in dets[0]:
            raise ModelError("keypoint scoring needs detections with 'keypoints'; is this a pose model?")
        for ann in gt["annotations"]:
            ann["area"] *= oks_area_scale

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            unknown = {d["image_id"] for d in dets} - set(coco_gt.getImgIds())
            if unknown:
                raise ModelError(f"detections name image ids {sorted(unknown)[:5]} that {name} does not have; "
                                 "score predictions of the same split")
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes cannot take an empty list; an empty result set scores AP = AR = 0
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if iou_type == "keypoints":
            ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    keys = BOX_KEYS if iou_type == "bbox" else KPT_KEYS
    return {k: float(v) for k, v in zip(keys, ev.stats, strict=True) if v > -1}


def operating_point(gt: Gt, detections: Iterable[dict[str, Any]], conf: float = 0.25,
                    iou: float = 0.5) -> dict[str, float]:
    """Precision, recall and F1 of the detections with score >= conf, at one IoU threshold (boxes only).

    Per image and class, detections are taken by descending score and each claims the unclaimed ground-truth box it
    overlaps most (IoU >= iou): a true positive, else a false positive; unclaimed boxes are false negatives. Every
    ground-truth box counts (iscrowd is not special-cased). Precision is 0 with no detections, recall 0 with no
    ground truth.
    """
    gts: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for ann in gt.get("annotations", []):
        gts[ann["image_id"], ann["category_id"]].append(ann["bbox"])
    dts: dict[tuple[int, int], list[tuple[float, list[float]]]] = defaultdict(list)
    for d in detections:
        if d["score"] >= conf:
            dts[d["image_id"], d["category_id"]].append((d["score"], d["bbox"]))

    tp = fp = 0
    for key, cand in dts.items():
        cand.sort(key=lambda sd: -sd[0])  # stable: equal scores keep their input order
        boxes = gts.get(key, [])
        if not boxes:
            fp += len(cand)
            continue
        # float64, as the boxes are; two empty boxes overlap 0, not 0/0
        ious = box_iou(torch.tensor([b for _, b in cand], dtype=torch.float64),
                       torch.tensor(boxes, dtype=torch.float64), fmt="xywh").nan_to_num(0.0).numpy()
        free = np.ones(len(boxes), bool)
        for row in ious:
            row = np.where(free, row, -1.0)
            j = int(row.argmax())
            if row[j] >= iou:
                free[j] = False
                tp += 1
            else:
                fp += 1
    n_gt = sum(len(v) for v in gts.values())
    fn = n_gt - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def evaluate_split(
    model_pt: str | Path,
    split_yaml: str | Path,
    imgsz: int,
    conf: float = 0.25,
    iou: float = 0.5,
    device: str | None = None,
    batch: int = 16,
) -> dict[str, float]:
    """Everything the eval stage reports for one model and split, from one Ultralytics val pass.

    pycocotools box scores (BOX_KEYS), `pose_`-prefixed keypoint scores for pose models, the operating point at
    (conf, iou), Ultralytics' own mAPs as `ultralytics_*`, and `map50_95_minus_ultralytics` (our minus theirs).
    """
    return evaluate_split_with_predictions(model_pt, split_yaml, imgsz, conf, iou, device, batch)[0]


def evaluate_split_with_predictions(
    model_pt: str | Path,
    split_yaml: str | Path,
    imgsz: int,
    conf: float = 0.25,
    iou: float = 0.5,
    device: str | None = None,
    batch: int = 16,
) -> tuple[dict[str, float], Detections]:
    """`evaluate_split`'s scores and the COCO detections they were computed from (for the predictions file)."""
    gt_path = gt_json_for(split_yaml)  # fail before the slow val pass
    gt, _ = load_gt(gt_path)
    dets, ultra = val_predictions(model_pt, split_yaml, imgsz, batch=batch, device=device)
    out = coco_scores(gt, dets, "bbox")
    if dets and "keypoints" in dets[0]:
        out.update({f"pose_{k}": v for k, v in coco_scores(gt, dets, "keypoints").items()})
    out.update(operating_point(gt, dets, conf=conf, iou=iou))
    out.update({f"ultralytics_{k}": v for k, v in ultra.items()})
    out["map50_95_minus_ultralytics"] = out["map50_95"] - ultra["map50_95"]
    if "pose_map50_95" in out and "pose_map50_95" in ultra:
        out["pose_map50_95_minus_ultralytics"] = out["pose_map50_95"] - ultra["pose_map50_95"]
    return out, dets


def map_lost(pytorch: dict[str, dict[str, float]], shipped: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per split, `map50_95_lost` and `map50_lost`: the PyTorch checkpoint's score minus the shipped file's (> 0:
    the export lost accuracy), for the splits and keys both have."""
    out: dict[str, dict[str, float]] = {}
    for split, scores in shipped.items():
        base = pytorch.get(split)
        if isinstance(scores, dict) and isinstance(base, dict):
            out[split] = {f"{k}_lost": base[k] - scores[k] for k in ("map50_95", "map50") if k in base and k in scores}
    return out
