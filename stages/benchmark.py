"""Stage benchmark: size, FLOPs and latency of every checkpoint and every shipped file, timed side by side in one run.

    python stages/benchmark.py --models-dir models --export-dir models/export --out-dir metrics/benchmark \
        --notes reports/benchmark_notes.json

Rows (yolo_compress.measure.benchmark_rows): each model of `benchmark.models` on PyTorch (`torch` group), and each file
the export stage made in its runtime (`.onnx` files on ONNX Runtime: `onnx` group; OpenVINO folders: `openvino`
group). All rows alternate within each of `benchmark.rounds` rounds (order rotated per round), on the same threads;
a speedup is the median over rounds of the baseline's p50 (in the row's runtime) over the row's p50 in the same
round, with its min, max and spread. A row whose spread exceeds
`benchmark.max_spread` is timed again once; still over, it is `flagged` (the report greys it out).

Writes `<out-dir>/<row>.json` = {model: {params_m, gflops, size_mb, ...}, torch | onnx | openvino: {latency_ms_p50,
..., speedup_vs_<baseline>, flagged}, gpu: {...}} and `<out-dir>/machine.json` (numbers only: threads, matmul peak, the
load average before and after the timings, VNNI), and `<notes>` with the strings: machine (CPU model, versions), one
line per problem (a file its runtime cannot load, or a runtime the machine lacks: that row is left out, the others
are kept) and the flagged rows.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from yolo_compress import files
from yolo_compress.config import load_params, section_dict
from yolo_compress.devices import all_cores, check_device
from yolo_compress.errors import stage_entrypoint
from yolo_compress.measure.benchmark_rows import gpu_device, measure_rows
from yolo_compress.measure.timing import cpu_has_vnni, machine_info, matmul_peak_gflops
from yolo_compress.models import pipeline_models, set_checkpoint_trust
from yolo_compress.ship.export import exported_files
from yolo_compress.tracking.runs import flat, log_artifact, log_metrics, set_tag, set_tags, stage_run

log = logging.getLogger("yolo_compress.measure.benchmark")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models-dir", type=Path, required=True, help="folder of <name>.pt")
    ap.add_argument("--export-dir", type=Path, required=True, help="the export stage's files and sidecars")
    ap.add_argument("--out-dir", type=Path, required=True, help="metrics folder, one <row>.json each")
    ap.add_argument("--notes", type=Path, required=True, help="strings: machine, problems, flagged rows (JSON)")
    return ap.parse_args()


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    cfg = params.benchmark
    check_device(cfg.device, "benchmark.device")
    set_checkpoint_trust(params.trust_checkpoints)
    files.check_outputs([args.out_dir, args.notes])
    models = pipeline_models(args.models_dir, cfg.models, "benchmark.models")  # fail before the slow part
    shipped = exported_files(args.export_dir) if cfg.onnx and args.export_dir.is_dir() else {}
    threads = cfg.threads or None  # 0 = all cores
    gpu, gpu_skip = gpu_device(cfg)
    notes: dict[str, Any] = {"machine": machine_info(), "problems": {}, "flagged": []}
    if gpu_skip:
        log.warning("%s", gpu_skip)
        notes["gpu"] = gpu_skip

    with stage_run("benchmark", section_dict(cfg)) as run:
        set_tags({f"machine.{k}": v for k, v in notes["machine"].items()})
        machine: dict[str, float] = {"threads": threads or all_cores(), "cpu_count": os.cpu_count() or 1,
                                     "int8_vnni": int(cpu_has_vnni())}
        machine["matmul_peak_gflops"] = matmul_peak_gflops(threads=threads)
        if gpu:
            machine["gpu_matmul_peak_gflops"] = matmul_peak_gflops(device=gpu)

        rows = measure_rows(cfg, models, shipped, threads, gpu, machine, notes)
        machine["flagged_rows"] = len(notes["flagged"])

        with files.atomic_dir(args.out_dir) as out_tmp:
            for name, groups in rows.items():
                files.write_json(out_tmp / f"{name}.json", {**groups, "mlflow_run_id": run.info.run_id})
            files.write_json(out_tmp / "machine.json", machine)
        notes["mlflow_run_id"] = run.info.run_id
        files.write_json(args.notes, notes)

        log_metrics({f"{name}.{k}": v for name, groups in rows.items() for k, v in flat(groups).items()})
        log_metrics({f"machine.{k}": v for k, v in machine.items()})
        for name, lines in notes["problems"].items():
            set_tag(f"problem.{name}", " | ".join(lines))
        for path in sorted(args.out_dir.glob("*.json")) + [args.notes]:
            log_artifact(str(path), artifact_path="metrics")


if __name__ == "__main__":
    main()
