"""Stage evaluate: pycocotools scores of every model on every eval split, one metrics file per model.

The splits are `evaluate.splits`, or every eval split of the prepared data (val, and test / test_shift when it
has them) when that is null; a listed split the data lacks stops the stage before any model runs.

    python stages/evaluate.py --data data/prepared --models-dir models --export-dir models/export \
        --out-dir metrics/evaluate --predictions-dir reports/predictions

Writes `<out-dir>/<model>.json` = {<split>: {map50_95, map50, ..., f1, ultralytics_map50_95, ...}, mlflow_run_id}
(numbers only, two levels, so `dvc metrics diff` shows e.g. `test.map50_95` per file) and the COCO detections
behind each score as `<predictions-dir>/<model>_<split>.json`. Both folders are replaced whole, never half-written.

Every mAP50-95 carries its uncertainty (yolo_compress.measure.bootstrap): `map50_95_std`, `map50_95_ci95_low` and
`map50_95_ci95_high` from 1,000 resamples of the split's images. Models scored on one split share its resamples,
so differences are paired: `distilled.json` has `map50_95_minus_student` with its interval, `pruned.json`
`map50_95_minus_distilled` and `map50_95_minus_prune_control` (against its epoch-matched control), every shipped
file `map50_95_lost` (against its checkpoint) with its interval, and each INT8 or FP16 file `map50_95_minus_fp32`
against the FP32 file of its runtime.

Every file the export stage made (`<export-dir>/<model>_<format>.onnx` through ONNX Runtime, and
`<model>_openvino_<precision>_openvino_model/` folders through OpenVINO, both run by Ultralytics' AutoBackend) is
scored the same way into `<out-dir>/<model>_<format>.json`, with `map50_95_lost` / `map50_lost` per split: its
PyTorch checkpoint's score minus the file's (when the checkpoint is in evaluate.models). A file its runtime cannot
run (or a runtime this machine lacks) costs only its own row: one warning line.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from yolo_compress import files
from yolo_compress.config import FILE_RUNTIMES, load_params, section_dict
from yolo_compress.data.prepared import eval_splits, load_summary, training_view
from yolo_compress.devices import use_all_cores
from yolo_compress.errors import DatasetError, UserError, stage_entrypoint
from yolo_compress.measure.bootstrap import interval_keys, map_samples, paired_keys
from yolo_compress.measure.evaluation import evaluate_split_with_predictions, gt_json_for, map_lost
from yolo_compress.models import pipeline_models, set_checkpoint_trust
from yolo_compress.ship.export import exported_files
from yolo_compress.tracking.runs import log_artifact, log_metrics, stage_run

log = logging.getLogger("yolo_compress.evaluate")
# (model, the model it is compared with, image by image): the distillation gain, pruning against its input, and
# against its epoch-matched control (what pruning cost once the extra training is equal)
PAIRED = (("distilled", "student"), ("pruned", "distilled"), ("pruned", "prune_control"))
FP32_OF = {"int8": "fp32", "fp16": "fp32", "openvino_int8": "openvino_fp32"}  # a shipped format -> its FP32 partner
MIN_IMAGES_FOR_INTERVALS = 30

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--models-dir", type=Path, required=True, help="folder of <name>.pt")
    ap.add_argument("--export-dir", type=Path, help="the export stage's <model>_<format>.onnx files (optional)")
    ap.add_argument("--out-dir", type=Path, required=True, help="metrics folder, one <model>.json each")
    ap.add_argument("--predictions-dir", type=Path, required=True, help="COCO detections, <model>_<split>.json")
    return ap.parse_args()


def check_splits(splits: list[str], data: Path) -> None:
    """Every split has its yaml and COCO ground truth (a dataset.json edited by hand may claim more): fail before the
    slow part."""
    for split in splits:
        split_yaml = data / "splits" / f"{split}.yaml"
        if not split_yaml.is_file():
            raise DatasetError(f"{split_yaml}: not found, so evaluate.splits lists '{split}' that {data} does not "
                               "have; rerun prepare (dvc repro prepare) or remove it from evaluate.splits")
        gt_json_for(split_yaml)


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    use_all_cores()  # torch threads: one per core, whatever the import order left
    cfg = params.evaluate
    set_checkpoint_trust(params.trust_checkpoints)
    files.check_outputs([args.out_dir, args.predictions_dir])
    models = pipeline_models(args.models_dir, cfg.models, "evaluate.models")
    # evaluate.splits null: every eval split the prepared data has (a user dataset may lack test or test_shift)
    sizes = load_summary(args.data)["images"]  # images per split
    splits = eval_splits(cfg.splits, list(sizes), args.data)
    check_splits(splits, args.data)
    for split in splits:
        if sizes[split] < MIN_IMAGES_FOR_INTERVALS:
            log.warning("%s has %d images (under %d): its bootstrap intervals below are wide and themselves uncertain",
                        split, sizes[split], MIN_IMAGES_FOR_INTERVALS)

    # Ultralytics writes label caches beside the labels: score scratch views, never the DVC-tracked dataset.
    views = {split: training_view(args.data, Path("runs") / "evaluate" / split, split=split) for split in splits}
    shipped = exported_files(args.export_dir) if args.export_dir and args.export_dir.is_dir() else {}
    with stage_run("evaluate", {**section_dict(cfg), "splits": splits}) as run:
        with files.atomic_dir(args.out_dir) as out_tmp, files.atomic_dir(args.predictions_dir) as pred_tmp:
            scored: dict[str, dict[str, dict[str, float]]] = {}
            samples: dict[tuple[str, str], np.ndarray] = {}  # (model, split) -> mAP50-95 of each resample

            def score(name: str, model: Path, imgsz: int) -> dict[str, dict[str, float]]:
                metrics: dict[str, dict[str, float]] = {}
                for split in splits:
                    scores, dets = evaluate_split_with_predictions(
                        model, views[split], imgsz,
                        conf=cfg.conf, iou=cfg.iou, batch=cfg.batch)
                    samples[name, split] = map_samples(gt_json_for(views[split]), dets, split)
                    scores.update(interval_keys("map50_95", samples[name, split]))
                    metrics[split] = scores
                    # compact: at conf 0.001 a split has up to 300 detections per image
                    (pred_tmp / f"{name}_{split}.json").write_text(json.dumps(dets, separators=(",", ":")))
                    log_metrics({f"{name}.{split}.{k}": v for k, v in scores.items()})
                    log.info("%s on %s: mAP50-95 %.4f (95%% interval %.4f-%.4f)  mAP50 %.4f  F1 %.3f", name, split,
                             scores["map50_95"], scores.get("map50_95_ci95_low", np.nan),
                             scores.get("map50_95_ci95_high", np.nan),
                             scores["map50"], scores["f1"])
                return metrics

            for name, pt in models.items():
                scored[name] = score(name, pt, cfg.imgsz)
            def add_paired(table: dict[str, dict[str, dict[str, float]]], name: str, base: str, key: str) -> None:
                """`key`: `name`'s mAP50-95 minus `base`'s per split, with the interval over the same resamples."""
                for split in splits:
                    point = table[name][split]["map50_95"] - table[base][split]["map50_95"]
                    table[name][split].update(paired_keys(key, point, samples[name, split], samples[base, split]))

            for name, base in PAIRED:
                if name in scored and base in scored:
                    add_paired(scored, name, base, f"map50_95_minus_{base}")
            for name in models:
                files.write_json(out_tmp / f"{name}.json", {**scored[name], "mlflow_run_id": run.info.run_id})
            scored_files: dict[str, dict[str, dict[str, float]]] = {}
            for key, (path, meta) in shipped.items():
                try:
                    metrics = score(key, path, int(meta["imgsz"]))  # the graph's fixed input size
                except Exception as err:  # noqa: BLE001 - ORT, OpenVINO and Ultralytics' backend raise many types
                    reason = str(err) if isinstance(err, UserError) else " ".join(str(err).split())[:200]
                    log.warning("%s: not scored: %s could not run %s (%s); check that it is installed (the README's "
                                "install command), or rerun `dvc repro export`", key, FILE_RUNTIMES[meta["runtime"]],
                                path, reason or type(err).__name__)
                    continue
                for split, lost in map_lost(scored.get(meta["model"], {}), metrics).items():
                    metrics[split].update(lost)
                    if (meta["model"], split) in samples:
                        metrics[split].update(interval_keys("map50_95_lost", samples[meta["model"], split] -
                                                            samples[key, split]))
                scored_files[key] = metrics
            for key, metrics in scored_files.items():  # INT8 / FP16 against the FP32 file of their runtime
                meta = shipped[key][1]
                fp32 = f"{meta['model']}_{FP32_OF[meta['format']]}" if meta["format"] in FP32_OF else None
                if fp32 in scored_files:
                    add_paired(scored_files, key, fp32, "map50_95_minus_fp32")
                files.write_json(out_tmp / f"{key}.json", {**metrics, "mlflow_run_id": run.info.run_id})
        for path in sorted(args.out_dir.glob("*.json")):
            log_artifact(str(path), artifact_path="metrics")

if __name__ == "__main__":
    main()
