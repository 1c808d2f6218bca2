"""Stage benchmark: size, FLOPs and latency of every checkpoint and every shipped file, timed side by side in one run.

    python stages/benchmark.py --models-dir models --export-dir models/export --out-dir metrics/benchmark \
        --notes reports/benchmark_notes.json

Rows: each model of `benchmark.models` on PyTorch (`torch` group), and each file the export stage made
(`<export-dir>/<model>_<format>.onnx`) on ONNX Runtime (`onnx` group). All rows alternate within each of
`benchmark.rounds` rounds (order rotated per round); a speedup is the median over rounds of the baseline's p50 over
the row's p50 in the same round, with its min, max and spread. PyTorch rows compare with `benchmark.baseline`, ONNX
rows with `<baseline>_fp32`. A row whose spread exceeds `benchmark.max_spread` is timed again once; still over, it is
`flagged` (the report greys it out).

Writes `<out-dir>/<row>.json` = {model: {params_m, gflops, size_mb, ...}, torch | onnx: {latency_ms_p50, ...,
speedup_vs_<baseline>, flagged}, gpu: {...}} and `<out-dir>/machine.json` (numbers only: threads, matmul peak, the
load average before and after the timings, VNNI), and `<notes>` with the strings: machine (CPU model, versions), one
line per problem (a file ONNX Runtime cannot load: that row is left out, the others are kept) and the flagged rows.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from yolo_compress import files
from yolo_compress.benchmark import default_threads, model_metrics
from yolo_compress.config import BenchmarkConfig, load_params, section_dict
from yolo_compress.errors import ModelError, stage_entrypoint
from yolo_compress.export import exported_files
from yolo_compress.models import pipeline_models, set_checkpoint_trust
from yolo_compress.timing import (
    Timer,
    cpu_has_vnni,
    latency_onnx,
    latency_torch,
    load_average,
    machine_info,
    matmul_peak_gflops,
    onnx_timer,
    throughput,
    timed_side_by_side,
    torch_timer,
)
from yolo_compress.tracking import flat, log_artifact, log_metrics, set_tag, set_tags, stage_run
from yolo_compress.training import check_device

log = logging.getLogger("yolo_compress.benchmark")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--models-dir", type=Path, required=True, help="folder of <name>.pt")
    ap.add_argument("--export-dir", type=Path, required=True, help="the export stage's <model>_<format>.onnx")
    ap.add_argument("--out-dir", type=Path, required=True, help="metrics folder, one <row>.json each")
    ap.add_argument("--notes", type=Path, required=True, help="strings: machine, problems, flagged rows (JSON)")
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
    shipped = exported_files(args.export_dir) if cfg.onnx and args.export_dir.is_dir() else {}
    threads = cfg.threads or None  # 0 = all cores
    gpu, gpu_skip = gpu_device(cfg)
    notes: dict[str, Any] = {"machine": machine_info(), "problems": {}, "flagged": []}
    if gpu_skip:
        log.warning("%s", gpu_skip)
        notes["gpu"] = gpu_skip

    with stage_run("benchmark", section_dict(cfg)) as run:
        set_tags({f"machine.{k}": v for k, v in notes["machine"].items()})
        machine: dict[str, float] = {"threads": threads or default_threads(), "cpu_count": os.cpu_count() or 1,
                                     "int8_vnni": int(cpu_has_vnni())}
        machine["matmul_peak_gflops"] = matmul_peak_gflops(threads=threads)
        if gpu:
            machine["gpu_matmul_peak_gflops"] = matmul_peak_gflops(device=gpu)

        rows: dict[str, dict[str, dict[str, float]]] = {}
        timers: dict[str, Timer] = {}
        runtime: dict[str, str] = {}
        for name, pt in models.items():
            rows[name] = {"model": model_metrics(pt, cfg.imgsz)}
            timers[name], runtime[name] = torch_timer(pt, cfg.imgsz), "torch"
        for key, (path, meta) in shipped.items():
            try:
                timers[key], runtime[key] = onnx_timer(path, threads), "onnx"
            except ModelError as err:
                notes["problems"][key] = [str(err)]
                log.warning("%s: %s", key, err)
                continue
            source = rows.get(meta["model"], {}).get("model") or model_metrics(meta["source"], int(meta["imgsz"]))
            rows[key] = {"model": {**{k: source[k] for k in ("params_m", "gflops", "gflops_fvcore") if k in source},
                                   "size_mb": path.stat().st_size / 1e6, "imgsz": int(meta["imgsz"])}}
        baselines = {n: (cfg.baseline if rt == "torch" else f"{cfg.baseline}_fp32") for n, rt in runtime.items()}
        baselines = {n: b for n, b in baselines.items() if b in timers}

        machine["load_1m_before"] = load_average()
        summary = timed_side_by_side(timers, baselines, cfg.rounds, cfg.repeats, cfg.warmup, cfg.max_spread,
                                     threads)
        machine["load_1m_after"] = load_average()
        for name, s in summary.items():
            group = {**s, "threads": machine["threads"], "throughput_batch": 1}
            group["gflops_per_s"] = rows[name]["model"]["gflops"] / (s["latency_ms_p50"] / 1e3)
            group["peak_fraction"] = group["gflops_per_s"] / machine["matmul_peak_gflops"]
            if runtime[name] == "torch":  # PyTorch also at the throughput batch (an ONNX file's batch is fixed at 1)
                group.update(throughput(models[name], cfg.imgsz, cfg.batch, cfg.warmup, cfg.repeats,
                                        threads))
            rows[name][runtime[name]] = group
            if s["flagged"]:
                notes["flagged"].append(name)
            log.info("%s (%s): p50 %.1f ms%s", name, runtime[name], s["latency_ms_p50"],
                     "  FLAGGED: spread over benchmark.max_spread" if s["flagged"] else "")
        if gpu:
            import onnxruntime as ort

            # without ORT's CUDA provider an ONNX "GPU" timing would silently be a CPU one
            ort_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
            if not ort_gpu and shipped:
                notes["gpu_onnx"] = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): ONNX files " \
                                    "not timed on the GPU"
            for name in summary:
                if runtime[name] == "torch":
                    lat = latency_torch(models[name], cfg.imgsz, 1, cfg.warmup, cfg.repeats, device=gpu)
                elif ort_gpu:
                    lat = latency_onnx(shipped[name][0], 1, cfg.warmup, cfg.repeats, threads, device=gpu)
                else:
                    continue
                rows[name]["gpu"] = {k: v for k, v in lat.items() if k != "batch"}
        machine["flagged_rows"] = len(notes["flagged"])

        with files.atomic_dir(args.out_dir) as out_tmp:
            for name, groups in rows.items():
                if name in summary:
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
