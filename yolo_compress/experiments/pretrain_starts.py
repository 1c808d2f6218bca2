"""Pretrained starts made by the project: yolo11n and yolo11s trained on the built-in synthetic data, for studies in
the users' regime (a pretrained student, a teacher one size up) with no download.

    python -m yolo_compress.experiments.pretrain_starts [--epochs 30] [--imgsz 160] [--seed 0]

Writes `models/start/synthetic_<model>.pt` (one per `--models` yaml; git-ignored) and `reports/pretrained_starts.json`
(committed): the command's arguments, the data params, each file's val mAP50-95, training time and its weights'
sha256 (over the tensors, so a checkpoint's embedded date does not count). models/start/ is a dependency of both
training stages, so the default pipeline retrains while the files are there (same scores: its params do not name
them); move them out before a default `dvc repro`. Rerunning with the same arguments on the same CPU type
gives the same weights hashes; another CPU type trains other floats (docs/study.md). The synthetic classes differ from
digits': the trainer re-heads a start to the data it trains on, keeping every other layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import ultralytics

from yolo_compress import files
from yolo_compress.config import DataConfig, TrainConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.data.prepared import training_view
from yolo_compress.devices import use_all_cores
from yolo_compress.errors import UserError, stage_entrypoint
from yolo_compress.measure.timing import cpu_has_vnni
from yolo_compress.models import load_model
from yolo_compress.train.training import train_model

log = logging.getLogger("yolo_compress.experiments.pretrain_starts")
WORK = Path(".study") / "pretrain"  # scratch: the data and the training runs (git-ignored)


def weights_sha256(pt: str | Path) -> str:
    """sha256 over the checkpoint's tensors, in state_dict order (the file also holds a date and run metadata)."""
    model = load_model(pt, "start").model
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def start_name(model_yaml: str) -> str:
    return f"synthetic_{Path(model_yaml).stem}.pt"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["yolo11n.yaml", "yolo11s.yaml"], help="Ultralytics model yamls")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--imgsz", type=int, default=160, help="image side of the data and of training")
    ap.add_argument("--train-images", type=int, default=400)
    ap.add_argument("--val-images", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="seeds the data and the training")
    ap.add_argument("--out-dir", type=Path, default=Path("models/start"))
    ap.add_argument("--record", type=Path, default=Path("reports/pretrained_starts.json"))
    return ap.parse_args(argv)


@stage_entrypoint
def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    for key in ("epochs", "train_images", "val_images", "batch"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')}: expected an int >= 1, got {getattr(args, key)}")
    if args.imgsz < 32 or args.imgsz % 32:
        raise UserError(f"--imgsz: expected a multiple of 32, got {args.imgsz}")
    use_all_cores()
    data_cfg = DataConfig(image_size=args.imgsz, train_images=args.train_images, val_images=args.val_images,
                          test_images=1, test_shift_images=1)
    data = WORK / f"data_s{args.seed}_{args.imgsz}_{args.train_images}_{args.val_images}"
    if not data.is_dir():
        prepare_dataset(data_cfg, args.seed, data)
    data_yaml = training_view(data, WORK / "view")
    made: dict[str, Any] = {}
    for model_yaml in args.models:
        cfg = TrainConfig(model=model_yaml, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                          nbs=args.batch, close_mosaic=max(1, args.epochs // 10), workers=0)
        log.info("pretraining %s on synthetic data: %d epochs at %d px", model_yaml, args.epochs, args.imgsz)
        t0 = time.monotonic()
        result = train_model(cfg, load_model(model_yaml, "--models"), data_yaml, WORK / Path(model_yaml).stem,
                             args.seed)
        out = args.out_dir / start_name(model_yaml)
        files.copy_file(result.best, out)
        made[out.name] = {"model": model_yaml, "val_map50_95": result.val.get("map50_95"),
                          "seconds": round(time.monotonic() - t0, 1), "weights_sha256": weights_sha256(out)}
        log.info("%s: val mAP50-95 %.4f, weights sha256 %s", out, made[out.name]["val_map50_95"] or 0.0,
                 made[out.name]["weights_sha256"][:12])
    record = {"command": "python -m yolo_compress.experiments.pretrain_starts", "seed": args.seed,
              "epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch,
              "data": dataclasses.asdict(data_cfg), "starts": made,
              "versions": {"torch": torch.__version__, "ultralytics": ultralytics.__version__},
              "machine": platform.machine(), "cpu_vnni": cpu_has_vnni()}  # float results differ between CPU types
    files.write_json(args.record, record)
    print(f"written: {', '.join(str(args.out_dir / n) for n in made)} and {args.record}")


if __name__ == "__main__":
    main()
