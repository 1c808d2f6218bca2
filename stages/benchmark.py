"""Stage benchmark: size, FLOPs, latency and throughput of every model, measured side by side in one run.

    python stages/benchmark.py --models-dir models --onnx-dir models/onnx --out-dir metrics/benchmark

Writes `<out-dir>/<model>.json` = {model: {params_m, gflops, ...}, torch: {latency_ms_p50, ..., speedup_vs_<baseline>},
onnx: {...}, gpu: {...}} plus `<out-dir>/machine.json` (numbers only: DVC shows strings as "-"), the batch-1 ONNX
graphs as `<onnx-dir>/<model>.onnx`, and `<onnx-dir>/notes.json` with the strings: the machine (CPU model,
versions) and one line per problem (e.g. a failed ONNX export: that model keeps its torch numbers, no onnx group).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from yolo_compress import files
from yolo_compress.benchmark import (
    benchmark_model,
    default_threads,
    grouped_metrics,
    machine_info,
    matmul_peak_gflops,
)
from yolo_compress.config import BenchmarkConfig, load_params, section_dict
from yolo_compress.errors import stage_entrypoint
from yolo_compress.models import pipeline_models, set_checkpoint_trust
from yolo_compress.tracking import flat, log_artifact, log_metrics, set_tag, set_tags, stage_run
from yolo_compress.training import check_device

log = logging.getLogger("yolo_compress.benchmark")

NOTES = "notes.json"  # in the onnx dir: a stage out the report can depend on, and outside the metrics dir


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models-dir", type=Path, required=True, help="folder of <name>.pt")
    ap.add_argument("--onnx-dir", type=Path, required=True, help="exported <name>.onnx and notes.json")
    ap.add_argument("--out-dir", type=Path, required=True, help="metrics folder, one <model>.json each")
    return ap.parse_args()


def gpu_device(cfg: BenchmarkConfig) -> tuple[str | None, str | None]:
    """('cuda:<i>', None) when benchmark.device asks for a GPU that exists, else (None, why GPU timing is skipped)."""
    if not str(cfg.device).isdigit():
        return None, None
    if not torch.cuda.is_available():
        return None, f"benchmark.device={cfg.device} but CUDA is not available: GPU timing skipped"
    if int(cfg.device) >= torch.cuda.device_count():
        return None, f"benchmark.device={cfg.device} but only {torch.cuda.device_count()} GPU(s): GPU timing skipped"
    return f"cuda:{cfg.device}", None


@stage_entrypoint
def main() -> None:
    args = parse_args()
    params = load_params(args.params)
    cfg = params.benchmark
    check_device(cfg.device, "benchmark.device")
    set_checkpoint_trust(params.trust_checkpoints)
    models = pipeline_models(args.models_dir, cfg.models, "benchmark.models")  # fail before the slow part
    threads = cfg.threads or None  # 0 = all cores
    gpu, gpu_skip = gpu_device(cfg)
    notes: dict[str, Any] = {"machine": machine_info(), "problems": {}}
    if gpu_skip:
        log.warning("%s", gpu_skip)
        notes["gpu"] = gpu_skip

    with stage_run("benchmark", section_dict(cfg)) as run:
        set_tags({f"machine.{k}": v for k, v in notes["machine"].items()})
        machine: dict[str, float] = {"threads": threads or default_threads(), "cpu_count": os.cpu_count() or 1}
        machine["matmul_peak_gflops"] = matmul_peak_gflops(threads=threads)
        if gpu:
            machine["gpu_matmul_peak_gflops"] = matmul_peak_gflops(device=gpu)
        log.info("matmul peak %.1f GFLOP/s on %d threads", machine["matmul_peak_gflops"], machine["threads"])

        with files.atomic_dir(args.out_dir) as out_tmp, files.atomic_dir(args.onnx_dir) as onnx_tmp:
            results: dict[str, dict[str, float]] = {}
            for name, pt in models.items():
                res = benchmark_model(pt, cfg.imgsz, onnx_tmp / f"{name}.onnx" if cfg.onnx else None, batch=1,
                                      warmup=cfg.warmup, repeats=cfg.repeats, threads=threads,
                                      peak_gflops=machine["matmul_peak_gflops"], throughput_batch=cfg.batch)
                results[name] = dict(res.metrics)
                if gpu:
                    on_gpu = benchmark_model(pt, cfg.imgsz, None, batch=1, warmup=cfg.warmup, repeats=cfg.repeats,
                                             peak_gflops=machine["gpu_matmul_peak_gflops"], device=gpu,
                                             throughput_batch=cfg.batch)
                    results[name].update({f"gpu_{k[6:]}": v for k, v in on_gpu.metrics.items()
                                          if k.startswith("torch_")})
                if res.problems:
                    notes["problems"][name] = [p.replace(f"{pt}: ", "", 1) for p in res.problems]
                log.info("%s: torch p50 %.1f ms, onnx p50 %s ms", name, res.metrics["torch_latency_ms_p50"],
                         f"{res.metrics['onnx_latency_ms_p50']:.1f}" if "onnx_latency_ms_p50" in res.metrics else "-")
            grouped = grouped_metrics(results, cfg.baseline)
            for name, groups in grouped.items():
                files.write_json(out_tmp / f"{name}.json", {**groups, "mlflow_run_id": run.info.run_id})
            files.write_json(out_tmp / "machine.json", machine)
            notes["mlflow_run_id"] = run.info.run_id
            files.write_json(onnx_tmp / NOTES, notes)

        log_metrics({f"{name}.{k}": v for name, groups in grouped.items() for k, v in flat(groups).items()})
        log_metrics({f"machine.{k}": v for k, v in machine.items()})
        for name, lines in notes["problems"].items():
            set_tag(f"problem.{name}", " | ".join(lines))
        for path in sorted(args.out_dir.glob("*.json")) + [args.onnx_dir / NOTES]:
            log_artifact(str(path), artifact_path="metrics")


if __name__ == "__main__":
    main()
