"""Stage export: the files a user ships, for every model in `export.models` and format in `export.formats`.

    python stages/export.py --data data/prepared --models-dir models --out-dir models/export \
        --metrics metrics/export.json

Writes `<out-dir>/<model>_<format>.onnx` (fp32: Ultralytics' exporter; int8: ONNX Runtime static quantization, QDQ,
per-channel, calibrated on `export.calib_images` training images; fp16) and
`<out-dir>/<model>_openvino_<fp32|int8>_openvino_model/` (OpenVINO IR of the same graph; int8 by NNCF on the same
images), each with `<model>_<format>.json` saying how it was made, `<out-dir>/notes.json` with one line per file that
could not be made, and `<metrics>` = {<model>_<format>: {size_mb, seconds}, mlflow_run_id}. A missing checkpoint, a
failed export or quantization, OpenVINO or NNCF not installed, or a file its runtime cannot load costs only that
model's (or that format's) row: one warning line, the others are kept.
The stage fails (one line) only when no file at all could be made.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import load_params, section_dict
from yolo_compress.devices import use_all_cores
from yolo_compress.errors import stage_entrypoint
from yolo_compress.models import MADE_BY, set_checkpoint_trust
from yolo_compress.ship.export import ExportError, calibration_images, export_model
from yolo_compress.tracking.runs import log_artifact, log_metrics, set_tag, stage_run

log = logging.getLogger("yolo_compress.ship.export")

NOTES = "notes.json"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder (train images calibrate int8)")
    ap.add_argument("--models-dir", type=Path, required=True, help="folder of <name>.pt")
    ap.add_argument("--out-dir", type=Path, required=True, help="exported files (.onnx, OpenVINO folders) and .json")
    ap.add_argument("--metrics", type=Path, required=True, help="metrics file: size and seconds per file")
    return ap.parse_args()


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    use_all_cores()  # torch threads: one per core, whatever the import order left
    cfg = params.export
    set_checkpoint_trust(params.trust_checkpoints)
    files.check_outputs([args.out_dir, args.metrics])
    problems: dict[str, list[str]] = {}
    models: dict[str, Path] = {}
    for name in cfg.models:
        pt = args.models_dir / f"{name}.pt"
        if pt.is_file():
            models[name] = pt
        else:
            problems[name] = [f"export.models lists '{name}' but {pt} does not exist; make it with `dvc repro "
                              f"{MADE_BY.get(name, name)}` or remove '{name}' from export.models"]
    calib: list[Path] | ExportError = []
    if {"int8", "openvino_int8"} & set(cfg.formats):
        try:
            calib = calibration_images(args.data / "images" / "train", cfg.calib_images)
        except ExportError as err:  # costs the int8 files only
            calib = err

    with stage_run("export", section_dict(cfg)) as run:
        metrics: dict[str, dict[str, float]] = {}
        with files.atomic_dir(args.out_dir) as out_tmp:
            for name, pt in models.items():
                res = export_model(name, pt, cfg, out_tmp, calib)
                metrics.update(res.metrics)
                if res.problems:
                    problems[name] = res.problems
                for key, m in res.metrics.items():
                    log.info("%s: %.2f MB in %.1f s", key, m["size_mb"], m["seconds"])
            files.write_json(out_tmp / NOTES, {"problems": problems, "mlflow_run_id": run.info.run_id})
        for name, lines in problems.items():
            for line in lines:
                log.warning("%s: %s", name, line)
            set_tag(f"problem.{name}", " | ".join(lines))
        if not metrics:
            first = next(iter(problems.items()))
            raise ExportError(f"no file was exported; {first[0]}: {first[1][0]}")
        files.write_json(args.metrics, {**metrics, "mlflow_run_id": run.info.run_id})
        log_metrics({f"{k}.{m}": v for k, ms in metrics.items() for m, v in ms.items()})
        log_artifact(str(args.metrics), artifact_path="metrics")
        log_artifact(str(args.out_dir / NOTES), artifact_path="export")


if __name__ == "__main__":
    main()
