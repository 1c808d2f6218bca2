"""Stage prepare: generate the built-in synthetic dataset (or import and validate yours) into one folder.

    python stages/prepare.py --out data/prepared --metrics metrics/prepare.json

First it checks that every file params.yaml names is one DVC tracks (yolo_compress/data/inputs.py). Then, before any
stage trains, it checks what the later stages will need from this dataset: every model params.yaml names (teacher.model,
student.model, distill.teacher, prune.model) and an explicit evaluate.splits list. A mistake stops the pipeline here
with one line instead of in its own stage, an hour of training later.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from yolo_compress import files
from yolo_compress.config import load_params, section_dict
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.data.inputs import check_tracked
from yolo_compress.data.prepared import eval_splits
from yolo_compress.errors import stage_entrypoint
from yolo_compress.models import set_checkpoint_trust
from yolo_compress.preflight import check_devices, check_params_models
from yolo_compress.tracking.runs import log_artifact, stage_run

log = logging.getLogger("yolo_compress.prepare")


def dataset_metrics(summary: dict) -> dict[str, dict[str, float]]:
    """Numbers-only, two-level view of the dataset summary."""
    out: dict[str, dict[str, float]] = {"images": dict(summary["images"]), "objects": dict(summary["objects"])}
    for split, buckets in summary["size_buckets"].items():
        for bucket, n in buckets.items():
            out.setdefault(f"objects_{bucket}", {})[split] = n
    out["dataset"] = {"nc": summary["nc"], "keypoints": (summary["kpt_shape"] or [0])[0]}
    return out


@stage_entrypoint
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", type=Path, required=True, help="prepared dataset folder")
    ap.add_argument("--metrics", type=Path, required=True)
    args = ap.parse_args()
    params = load_params(args.params)
    set_checkpoint_trust(params.trust_checkpoints)  # prepare loads the .pt files params names, to check them

    check_devices(params)
    check_tracked(params)
    files.check_outputs([args.out, args.metrics])
    with stage_run("prepare", {**section_dict(params.data), "seed": params.seed}) as run:
        summary = prepare_dataset(params.data, params.seed, args.out)
        eval_splits(params.evaluate.splits, list(summary["images"]), args.out)
        check_params_models(params, args.out)
        metrics = {**dataset_metrics(summary), "mlflow_run_id": run.info.run_id}
        files.write_json(args.metrics, metrics)
        log_artifact(str(args.metrics))
        log_artifact(str(args.out / "dataset.json"))
    log.info("prepare: %s dataset with %s images -> %s", summary["task"], summary["images"], args.out)


if __name__ == "__main__":
    main()
