"""Stage prune: iterative structured pruning + fine-tuning rounds of the distilled student, in one stage, then the
kept round's epoch-matched control (the input fine-tuned as long, unpruned: what the extra epochs alone give).

    python stages/prune.py --data data/prepared --model models/distilled.pt --teacher models/teacher.pt \
        --out models/pruned.pt --rounds-dir models/prune_rounds --control models/prune_control.pt \
        --metrics metrics/prune.json --plots plots/prune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import DistillConfig, Params, load_params, section_dict
from yolo_compress.data.prepared import load_summary
from yolo_compress.devices import check_device, use_all_cores
from yolo_compress.errors import ModelError, stage_entrypoint
from yolo_compress.models import (
    YOLO,
    check_same_head,
    count_params,
    dataset_head,
    load_model,
    model_info,
    set_checkpoint_trust,
    trained_epochs,
)
from yolo_compress.prune.run import (
    control_finetune,
    control_metrics,
    kept_round,
    prune_metrics,
    prune_rounds,
    rounds_setup,
)
from yolo_compress.splitfree import check_prunable, make_split_free
from yolo_compress.tracking.runs import child_run, log_artifact, log_metrics, log_params, set_tag, stage_run
from yolo_compress.train.training import checkpoint_room

log = logging.getLogger("yolo_compress.prune")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--model", type=Path, required=True, help="the .pt to prune (dvc.yaml passes prune.model)")
    ap.add_argument("--teacher", type=Path, required=True,
                    help="prune.distill: the teacher (distill.teacher), unless prune.teacher is input")
    ap.add_argument("--out", type=Path, required=True, help="where the kept round's .pt goes")
    ap.add_argument("--rounds-dir", type=Path, required=True, help="one round_<k>.pt per round")
    ap.add_argument("--control", type=Path, required=True, help="the epoch-matched control's .pt")
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--plots", type=Path, required=True, help="per-round records (JSON list)")
    return ap.parse_args()


def checked_inputs(args: argparse.Namespace, params: Params) -> tuple[YOLO, DistillConfig | None]:
    """The model to prune and the distill config (None unless prune.distill); checked before any work."""
    cfg, dcfg = params.prune, params.distill
    path, key = args.model, "prune.model"
    model = load_model(path, key)
    summary = load_summary(args.data)
    data = dataset_head(summary)
    check_same_head(model_info(model), data, f"{key} {path}", f"dataset {args.data}")
    check_prunable(make_split_free(model.model), f"{key}: {path}")
    if not cfg.distill:
        return model, None
    # prune.teacher input: the unpruned model teaches its pruned self (same head, so no check beyond the model's)
    teacher, tkey = (args.model, "prune.model") if cfg.teacher == "input" else (args.teacher, "distill.teacher")
    check_same_head(model_info(load_model(teacher, tkey)), data, f"{tkey} {teacher}", f"dataset {args.data}")
    return model, dataclasses.replace(dcfg, teacher=str(teacher))


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    use_all_cores()  # torch threads: one per core, whatever the import order left
    cfg, st = params.prune, params.student
    check_device(st.device, "student.device")
    set_checkpoint_trust(params.trust_checkpoints)
    input_model, distill = checked_inputs(args, params)
    input_pt = args.model
    work = Path("runs") / "prune"
    # every round's fine-tune, and the control's, keeps its checkpoints under runs/prune
    room = checkpoint_room(input_model) * (2 * cfg.rounds + 2)
    files.check_outputs([args.out, args.rounds_dir, args.control, args.metrics, args.plots, work], room)

    setup = rounds_setup(params, args.data, work, input_model.task, distill)
    logged = {"prune": section_dict(cfg), "seed": params.student_seed,
              "student": {k: getattr(st, k)
                          for k in ("imgsz", "batch", "nominal_batch", "optimizer", "workers", "device")},
              **({"distill": section_dict(distill)} if distill else {})}
    # Rounds go to a temp sibling of --rounds-dir, swapped in when the block ends: no half-written round survives.
    with stage_run("prune", logged) as run, files.atomic_dir(args.rounds_dir) as tmp_rounds:
        rows = []
        for row, round_params in prune_rounds(input_pt, tmp_rounds, setup):
            rows.append(row)
            if round_params:
                with child_run(f"round {row['round']}"):
                    log_params(round_params)
                    log_metrics({key: v for key, v in row.items() if key != "round"})
        keep, warnings = kept_round(rows, cfg)
        for warning in warnings:
            log.warning("\n%s\n%s\n%s", "!" * 100, f"{warning} ({args.out})", "!" * 100)
        if warnings:
            set_tag("warning", " | ".join(warnings))
        files.copy_file(tmp_rounds / f"round_{keep}.pt", args.out)
        if count_params(YOLO(str(args.out))) != count_params(YOLO(str(tmp_rounds / f"round_{keep}.pt"))):
            raise ModelError(f"{args.out}: reloads with another parameter count than round {keep}'s checkpoint")
        metrics = prune_metrics(rows, keep, cfg, trained_epochs(input_model))
        epochs = metrics["pruned"]["finetune_epochs"]
        log.info("prune: the control: the input fine-tuned %d epochs like rounds 1-%d, unpruned", epochs, keep)
        files.copy_file(control_finetune(input_pt, keep, setup), args.control)
        metrics["control"] = control_metrics(args.control, args.out, epochs, setup)
        metrics["mlflow_run_id"] = run.info.run_id
        log_metrics({f"{g}.{k}": v for g, d in metrics.items() if isinstance(d, dict) for k, v in d.items()})
        files.write_json(args.plots, rows)
        files.write_json(args.metrics, metrics)
        log_artifact(str(args.metrics))
        log_artifact(str(args.plots))
    log.info("prune: %.4f -> %.4f GFLOPs, val mAP50-95 %.4f -> %.4f (round %d) -> %s", rows[0]["gflops"],
             rows[keep]["gflops"], rows[0]["map50_95_after"], rows[keep]["map50_95_after"], keep, args.out)
    c = metrics["control"]
    log.info("prune: against the control (%s, val %.4f): pruned %+.4f [%+.4f, %+.4f]", args.control, c["map50_95"],
             c["pruned_minus_control"], c["pruned_minus_control_ci95_low"], c["pruned_minus_control_ci95_high"])


if __name__ == "__main__":
    main()
