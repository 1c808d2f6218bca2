"""Why pycocotools and Ultralytics disagree on mAP50-95 here, measured side by side on the same detections.

    python -m yolo_compress.experiments.map_agreement [--models teacher student distilled pruned] [--split val]

For each model, one Ultralytics val pass gives its own mAP and the detections that pycocotools scores (the
`evaluate` stage does the same). A second pass scores with the predicted boxes clipped to the image, as the saved
detections are: Ultralytics' validator matches boxes that run into the letterbox padding, which lowers their IoU
with objects cut by the image border. Writes reports/map_agreement.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolo_compress import files
from yolo_compress.config import EVAL_SPLITS, MODEL_NAMES
from yolo_compress.data.prepared import training_view
from yolo_compress.errors import stage_entrypoint
from yolo_compress.measure.evaluation import coco_scores, gt_json_for, val_predictions
from yolo_compress.models import load_model


def _clipping_validator(base: type) -> type:
    class _Clipped(base):  # type: ignore[misc, valid-type]
        def update_metrics(self, preds: list[dict[str, Any]], batch: dict[str, Any]) -> None:
            clipped = []
            for si, pred in enumerate(preds):
                (h, w), ((gain, _), (pad_w, pad_h)) = batch["ori_shape"][si], batch["ratio_pad"][si]
                boxes = pred["bboxes"].clone()  # letterbox space: the image spans pad .. pad + size * gain
                boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(pad_w, pad_w + w * gain)
                boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(pad_h, pad_h + h * gain)
                clipped.append({**pred, "bboxes": boxes})
            super().update_metrics(clipped, batch)

    return _Clipped


def ultralytics_map_clipped(model_pt: Path, split_yaml: Path, imgsz: int) -> float:
    """Ultralytics' val mAP50-95 with every predicted box clipped to the image first."""
    model = load_model(model_pt, "model")
    validator = _clipping_validator(model.task_map[model.task]["validator"])
    with tempfile.TemporaryDirectory(prefix="yc-val-") as tmp:
        metrics = model.val(validator=validator, data=str(split_yaml), split="val", imgsz=imgsz, conf=0.001,
                            iou=0.7, plots=False, verbose=False, project=tmp, name="val", exist_ok=True)
    return float(metrics.box.map)


def border_share(gt: dict[str, Any]) -> float:
    """Fraction of ground-truth boxes that touch the image border."""
    size = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    touching = 0
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        iw, ih = size[a["image_id"]]
        touching += x <= 0 or y <= 0 or x + w >= iw or y + h >= ih
    return touching / max(len(gt["annotations"]), 1)


def agreement_table(models: Sequence[str], split: str, data: Path, imgsz: int) -> str:
    view = training_view(data, Path("runs") / "map_agreement" / split, split=split)
    gt = files.read_json(gt_json_for(view))
    lines = [f"# pycocotools vs Ultralytics mAP50-95 ({split}, {len(gt['images'])} images, "
             f"{border_share(gt):.0%} of objects touch the image border)", "",
             "| model | pycocotools | Ultralytics | difference | Ultralytics, boxes clipped | difference |",
             "|---|---|---|---|---|---|"]
    for name in models:
        pt = Path("models") / f"{name}.pt"
        dets, ultra = val_predictions(pt, view, imgsz)
        coco = coco_scores(gt, dets)["map50_95"]
        clipped = ultralytics_map_clipped(pt, view, imgsz)
        lines.append(f"| {name} | {coco:.4f} | {ultra['map50_95']:.4f} | {coco - ultra['map50_95']:+.4f} | "
                     f"{clipped:.4f} | {coco - clipped:+.4f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


@stage_entrypoint
def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    ap.add_argument("--split", choices=EVAL_SPLITS, default="val")
    ap.add_argument("--data", type=Path, default=Path("data/prepared"))
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("reports/map_agreement.md"))
    args = ap.parse_args(argv)
    table = agreement_table(args.models, args.split, args.data, args.imgsz)
    files.write_text(args.out, table)
    print(table)


if __name__ == "__main__":
    main()
