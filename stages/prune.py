"""Stage prune: iterative structured pruning + fine-tuning rounds of the distilled student, in one stage.

    python stages/prune.py --data data/prepared --model models/distilled.pt --teacher models/teacher.pt \
        --out models/pruned.pt --rounds-dir models/prune_rounds --metrics metrics/prune.json --plots plots/prune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from yolo_compress import files, pruning
from yolo_compress.benchmark import gflops_ultralytics
from yolo_compress.config import DistillConfig, Params, load_params, section_dict
from yolo_compress.dataset import load_summary, training_view
from yolo_compress.distill import check_native
from yolo_compress.errors import ModelError, stage_entrypoint
from yolo_compress.evaluation import evaluate_split
from yolo_compress.models import (
    YOLO,
    check_same_head,
    count_params,
    dataset_head,
    load_model,
    model_info,
    set_checkpoint_trust,
)
from yolo_compress.splitfree import check_prunable, make_split_free
from yolo_compress.tracking import child_run, log_artifact, log_metrics, log_params, set_tag, stage_run
from yolo_compress.training import check_device, use_all_cores

log = logging.getLogger("yolo_compress.prune")
# Unaugmented train batches for BatchNorm recalibration after each pruning step (and taylor importance's gradients):
# 8 gave the same round-1 mAP as 32 (0.055 vs 0.056), in 2.5 s against 8 s.
CALIB_BATCHES = 8


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--model", type=Path, required=True, help="the .pt to prune (dvc.yaml passes prune.model)")
    ap.add_argument("--teacher", type=Path, required=True, help="prune.distill: the teacher (distill.teacher)")
    ap.add_argument("--out", type=Path, required=True, help="where the kept round's .pt goes")
    ap.add_argument("--rounds-dir", type=Path, required=True, help="one round_<k>.pt per round")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True, help="per-round records (JSON list)")
    return ap.parse_args()


def checked_inputs(args: argparse.Namespace, params: Params) -> tuple[Path, str, DistillConfig | None]:
    """The model to prune, its task and the distill config (None unless prune.distill); checked before any work."""
    cfg, dcfg = params.prune, params.distill
    path, key = args.model, "prune.model"
    model = load_model(path, key)
    summary = load_summary(args.data)
    data = dataset_head(summary)
    check_same_head(model_info(model), data, f"{key} {path}", f"dataset {args.data}")
    check_prunable(make_split_free(model.model), f"{key}: {path}")
    if not cfg.distill:
        return path, model.task, None
    check_native(dcfg)  # the same distill: checks as the distill stage
    teacher, tkey = args.teacher, "distill.teacher"
    check_same_head(model_info(load_model(teacher, tkey)), data, f"{tkey} {teacher}", f"dataset {args.data}")
    return path, model.task, dataclasses.replace(dcfg, teacher=str(teacher))


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    cfg, st = params.prune, params.student
    check_device(st.device, "student.device")
    set_checkpoint_trust(params.trust_checkpoints)
    input_pt, task, distill = checked_inputs(args, params)
    ratios = pruning.prune_schedule(cfg.target, cfg.rounds, cfg.schedule)

    work = Path("runs") / "prune"
    data_yaml = training_view(args.data, work / "data")
    val_yaml = training_view(args.data, work / "val", split="val")
    # Warm-up off: it starts the bias lr at 0.1, which wrecks trained weights in a short fine-tune.
    ft = dict(data_yaml=data_yaml, imgsz=st.imgsz, batch=st.batch, nbs=st.nominal_batch, lr0=cfg.lr0,
              seed=params.student_seed, optimizer=st.optimizer, workers=st.workers, device=st.device,
              warmup_epochs=0.0, plots=False, distill=distill, callbacks={"on_pretrain_routine_start": use_all_cores})

    def score(pt: Path) -> float:  # the one mAP of this stage: pycocotools mAP50-95 on the prepared val split
        return evaluate_split(pt, val_yaml, st.imgsz, device=st.device, batch=st.batch)["map50_95"]

    def row(k: int, pt: Path, before: float | None, t0: float) -> dict[str, float]:  # every row measured alike
        gflops, after = gflops_ultralytics(pt, st.imgsz), score(pt)
        if gflops <= 0:
            raise ModelError(f"{pt}: could not count its GFLOPs (thop failed on this model)")
        return {"round": k, "params_m": count_params(YOLO(str(pt))) / 1e6, "gflops": gflops,
                "map50_95_before": after if before is None else before, "map50_95_after": after,
                "seconds": time.perf_counter() - t0}

    logged = {"prune": section_dict(cfg), "seed": params.student_seed,
              "student": {k: getattr(st, k)
                          for k in ("imgsz", "batch", "nominal_batch", "optimizer", "workers", "device")},
              **({"distill": section_dict(distill)} if distill else {})}
    # Rounds go to a temp sibling of --rounds-dir, swapped in when the block ends: no half-written round survives.
    with stage_run("prune", logged) as run, files.atomic_dir(args.rounds_dir) as tmp_rounds:
        rows = [row(0, input_pt, None, time.perf_counter())]
        base, current = rows[0]["map50_95_after"], input_pt
        if cfg.importance == "bn" and cfg.sparsity_epochs > 0 and cfg.sparsity_l1 > 0:
            log.info("prune: %d epoch(s) of BN-gamma L1 sparsity training first", cfg.sparsity_epochs)
            current = pruning.finetune(input_pt, epochs=cfg.sparsity_epochs, work_dir=work / "sparsity",
                                       bn_l1=cfg.sparsity_l1, **ft)
        calib = pruning.calibration_batches(data_yaml, st.imgsz, st.batch, CALIB_BATCHES, task)
        for k, ratio in enumerate(ratios, 1):
            with child_run(f"round {k}"):
                t0, dst = time.perf_counter(), tmp_rounds / f"round_{k}.pt"
                info = pruning.prune_finetune_round(
                    current, dst, ratio, work / f"round_{k}", score, importance=cfg.importance, round_to=cfg.round_to,
                    measure=cfg.measure, head=cfg.head, activation=cfg.activation,
                    epochs=cfg.round_epochs(k), calib=calib, meta={"round": k}, **ft)
                rows.append(row(k, dst, info["map50_95_before"], t0))
                current = dst
                log_params({"round": k, "ratio": ratio, "channel_ratio": info["channel_ratio"]})
                log_metrics({key: v for key, v in rows[-1].items() if key != "round"})
                log.info("prune round %(round)d: %(gflops).4f GFLOPs, %(params_m).3fM params, val mAP50-95 "
                         "%(map50_95_before).4f before, %(map50_95_after).4f after fine-tune", rows[-1])
            if base - rows[-1]["map50_95_after"] > cfg.max_map_drop:
                break
        done = len(rows) - 1
        keep = pruning.pick_round([r["map50_95_after"] for r in rows[1:]], base, cfg.max_map_drop)
        if keep != done:
            warning = (f"PRUNING STOPPED after round {done} of {cfg.rounds}: val mAP50-95 "
                       f"{rows[-1]['map50_95_after']:.4f} is more than prune.max_map_drop={cfg.max_map_drop} below "
                       f"the input's {base:.4f}. Keeping round {keep} as {args.out}"
                       f"{'' if keep < done else ', though it is outside the bound too (no round is inside)'}.")
            log.warning("\n%s\n%s\n%s", "!" * 100, warning, "!" * 100)
            set_tag("warning", warning)
        kept, first = rows[keep], rows[0]
        files.copy_file(tmp_rounds / f"round_{keep}.pt", args.out)
        if count_params(YOLO(str(args.out))) != count_params(YOLO(str(tmp_rounds / f"round_{keep}.pt"))):
            raise ModelError(f"{args.out}: reloads with another parameter count than round {keep}'s checkpoint")
        metrics = {
            "input": {k: first[k] for k in ("params_m", "gflops")} | {"map50_95": base},
            "pruned": {"params_m": kept["params_m"], "gflops": kept["gflops"], "map50_95": kept["map50_95_after"],
                       "rounds_done": done, "best_round": keep},
            "ratio": {"gflops_removed": 1 - kept["gflops"] / first["gflops"],
                      "params_removed": 1 - kept["params_m"] / first["params_m"]},
            "change": {"map50_95": kept["map50_95_after"] - base},
            "time": {"seconds_total": sum(r["seconds"] for r in rows)},
            "mlflow_run_id": run.info.run_id,
        }
        log_metrics({f"{g}.{k}": v for g, d in metrics.items() if isinstance(d, dict) for k, v in d.items()})
        files.write_json(args.plots, rows)
        files.write_json(args.metrics, metrics)
        log_artifact(str(args.metrics))
        log_artifact(str(args.plots))
    log.info("prune: %.4f -> %.4f GFLOPs, val mAP50-95 %.4f -> %.4f (round %d) -> %s", first["gflops"],
             kept["gflops"], base, kept["map50_95_after"], keep, args.out)


if __name__ == "__main__":
    main()
