"""Stage train_teacher / train_student: train one model on the prepared dataset.

    python stages/train.py --role student --data data/prepared --out models/student.pt \
        --metrics metrics/student.json --plots plots/train_student.json --teacher models/teacher.pt
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import load_params, section_dict
from yolo_compress.data.prepared import load_summary, training_view
from yolo_compress.devices import check_device, use_all_cores
from yolo_compress.errors import stage_entrypoint
from yolo_compress.models import (
    check_same_head,
    check_task,
    dataset_head,
    load_model,
    model_info,
    model_size,
    set_checkpoint_trust,
)
from yolo_compress.tracking.runs import log_artifact, log_epoch, log_metrics, set_tag, stage_run
from yolo_compress.train.metrics import teacher_gap
from yolo_compress.train.training import checkpoint_room, train_model

log = logging.getLogger("yolo_compress.train")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", choices=("teacher", "student"), required=True)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--out", type=Path, required=True, help="where the trained .pt goes")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True, help="per-epoch curve (JSON records)")
    ap.add_argument("--teacher", type=Path, help="student only: the teacher .pt to compare against")
    ap.add_argument("--teacher-metrics", type=Path, help="student only: the teacher's metrics file")
    return ap.parse_args()


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    use_all_cores()  # torch threads: one per core, whatever the import order left
    cfg = getattr(params, args.role)
    check_device(cfg.device, f"{args.role}.device")
    set_checkpoint_trust(params.trust_checkpoints)
    stage = f"train_{args.role}"

    summary = load_summary(args.data)
    data = dataset_head(summary)
    model = load_model(cfg.model, f"{args.role}.model")
    check_task(model, f"{args.role}.model", cfg.model, data, args.data)
    teacher_val = None
    if args.teacher:
        check_same_head(model_info(load_model(args.teacher, "--teacher")), data, str(args.teacher), str(args.data))
        teacher_val = files.read_json(args.teacher_metrics)["val"]

    work = Path("runs") / stage
    files.check_outputs([args.out, args.metrics, args.plots, work], checkpoint_room(model))
    data_yaml = training_view(args.data, work / "data")
    seed = params.student_seed if args.role == "student" else params.seed
    logged = {**section_dict(cfg), "seed": seed}
    with stage_run(stage, logged) as run:
        result = train_model(cfg, model, data_yaml, work / "train", seed,
                             on_epoch=log_epoch,
                             resume=params.resume, inputs=[args.data, cfg.model])
        metrics = {
            "val": result.val,
            "train": {"epochs": cfg.epochs, "seconds_per_epoch": result.seconds_per_epoch,
                      "seconds_total": sum(r["seconds"] for r in result.curve),
                      "resumed_after_epoch": result.resumed_after},
            "model": model_size(result.best, cfg.imgsz),
        }
        if teacher_val is not None:
            metrics["teacher_gap"] = teacher_gap(teacher_val, result.val, cfg.min_teacher_gap)
            if not metrics["teacher_gap"]["teacher_clearly_better"]:
                warning = (f"TEACHER IS NOT CLEARLY BETTER: teacher val mAP50-95 {teacher_val['map50_95']:.4f} vs "
                           f"student {result.val['map50_95']:.4f} (gap {metrics['teacher_gap']['map50_95']:+.4f}, "
                           f"want >= {cfg.min_teacher_gap}). Distilling from it will likely lower accuracy: "
                           "train the teacher longer (teacher.epochs) or pick a stronger teacher.model.")
                log.warning("\n%s\n%s\n%s", "!" * 100, warning, "!" * 100)
                set_tag("warning", warning)
        metrics["mlflow_run_id"] = run.info.run_id
        log_metrics({f"best.{k}": v for k, v in result.val.items()})

        with files.weights_kept(result.best):
            files.copy_file(result.best, args.out)
            files.write_json(args.plots, result.curve)
            files.write_json(args.metrics, metrics)
        log_artifact(str(args.metrics))
        log_artifact(str(args.plots))
        for png in sorted((work / "train").glob("*.png")):
            log_artifact(str(png), artifact_path="plots")
    log.info("%s: val mAP50-95 %.4f -> %s", stage, result.val.get("map50_95", 0.0), args.out)


if __name__ == "__main__":
    main()
