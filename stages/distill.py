"""Stage distill: train the student architecture on the student: budget plus a frozen teacher (loss distill.loss).

    python stages/distill.py --data data/prepared --teacher models/teacher.pt --student-metrics metrics/student.json \
        --out models/distilled.pt --metrics metrics/distill.json --plots plots/distill.json

Every loss (sl2, mgd, cwd, logit) goes in through the project's trainer (yolo_compress.train.trainer);
models/distilled.pt is a plain student checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import load_params, section_dict
from yolo_compress.data.prepared import training_view
from yolo_compress.devices import check_device, use_all_cores
from yolo_compress.errors import stage_entrypoint
from yolo_compress.models import model_size, set_checkpoint_trust
from yolo_compress.tracking.runs import log_artifact, log_epoch, log_metrics, stage_run
from yolo_compress.train import distill
from yolo_compress.train.trainer import distill_setup
from yolo_compress.train.training import checkpoint_room, train_model

log = logging.getLogger("yolo_compress.train.distill")
STAGE = "distill"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--teacher", type=Path, required=True, help="the teacher .pt (dvc.yaml passes distill.teacher)")
    ap.add_argument("--student-metrics", type=Path, required=True, help="the plain student's metrics (baseline)")
    ap.add_argument("--out", type=Path, required=True, help="where the distilled student .pt goes")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True, help="per-epoch curve (JSON records)")
    return ap.parse_args()


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    use_all_cores()  # torch threads: one per core, whatever the import order left
    cfg, dcfg, seed = params.student, params.distill, params.student_seed

    # Every check before the first epoch: a bad input costs seconds, not a training run.
    check_device(cfg.device, "student.device")
    set_checkpoint_trust(params.trust_checkpoints)
    setup = distill_setup(dcfg, args.teacher)
    if dcfg.unlabeled:
        distill.unlabeled_images(dcfg.unlabeled)
    model = distill.checked_inputs(cfg, args.data, args.teacher)
    student_metrics = files.read_json(args.student_metrics)

    work = Path("runs") / STAGE
    files.check_outputs([args.out, args.metrics, args.plots, work], checkpoint_room(model))
    data_yaml = training_view(args.data, work / "data")
    logged = {**section_dict(dcfg), "weight_used": dcfg.base_weight, "teacher_path": str(args.teacher),
              "student": section_dict(cfg), "seed": seed}
    with stage_run(STAGE, logged) as run:
        result = train_model(cfg, model, data_yaml, work / "train", seed,
                             on_epoch=log_epoch,
                             resume=params.resume, inputs=[args.data, cfg.model, args.teacher], **setup)
        dis = [r.get("train_dis_loss", 0.0) for r in result.curve]
        spe = result.seconds_per_epoch
        student_spe = float(student_metrics["train"]["seconds_per_epoch"])
        size = model_size(result.best, cfg.imgsz)
        metrics = {
            "val": result.val,
            "train": {"epochs": cfg.epochs, "seconds_per_epoch": spe,
                      "seconds_total": sum(r["seconds"] for r in result.curve),
                      "resumed_after_epoch": result.resumed_after,
                      "seconds_per_epoch_ratio_vs_student": spe / student_spe if student_spe > 0 else 0.0},
            "distill": {"loss_final": dis[-1] if dis else 0.0, "loss_mean": statistics.fmean(dis) if dis else 0.0,
                        "weight": dcfg.base_weight,
                        # the teacher's forward is most of the overhead; report it beside the time ratio
                        "teacher_gflops_ratio": model_size(args.teacher, cfg.imgsz)["gflops"] / size["gflops"]},
            "vs_student": {f"{k}_gain": result.val.get(k, 0.0) - float(student_metrics["val"].get(k, 0.0))
                           for k in ("map50_95", "pose_map50_95") if k in result.val},
            "model": size,
            "mlflow_run_id": run.info.run_id,
        }
        log_metrics({f"best.{k}": v for k, v in result.val.items()})
        log_metrics({f"{k}.{m}": v for k, sec in metrics.items() if k in ("train", "distill", "vs_student")
                            for m, v in sec.items()})

        with files.weights_kept(result.best):
            files.copy_file(result.best, args.out)
            files.write_json(args.plots, result.curve)
            files.write_json(args.metrics, metrics)
        log_artifact(str(args.metrics))
        log_artifact(str(args.plots), artifact_path="plots")  # same file name as the metrics file
        for png in sorted((work / "train").glob("*.png")):
            log_artifact(str(png), artifact_path="plots")
    key = "pose_map50_95" if "pose_map50_95" in result.val else "map50_95"  # pose is judged on keypoint AP
    gain = metrics["vs_student"][f"{key}_gain"]
    if gain > 0:
        log.info("distill (%s): val %s %.4f (%+.4f vs the plain student) -> %s", dcfg.loss, key, result.val[key],
                 gain, args.out)
    else:
        log.warning("distill (%s): NO GAIN: val %s %.4f is %+.4f against the plain student, so the distilled model is "
                    "not an improvement here; ship the student (reports/study_findings.md) -> %s", dcfg.loss, key,
                    result.val[key], gain, args.out)


if __name__ == "__main__":
    main()
