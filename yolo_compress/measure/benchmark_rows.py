"""The benchmark stage's rows: size and FLOPs of every checkpoint and shipped file, all timed side by side.

Rows: each model of `benchmark.models` on PyTorch (`torch` group), and each file the export stage made in its own
runtime (`onnx` group: ONNX Runtime; `openvino` group: OpenVINO). All rows alternate within each round
(`timing.timed_side_by_side`), on the same thread count. Each row's speedup is against the baseline in the same
runtime: PyTorch rows against `benchmark.baseline`, ONNX Runtime rows against `<baseline>_fp32`, OpenVINO rows against
`<baseline>_openvino_fp32`. A file its runtime cannot load (or a runtime the machine lacks) is left out with one line
in `notes["problems"]`; the other rows are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from yolo_compress import files
from yolo_compress.config import BenchmarkConfig
from yolo_compress.errors import ModelError
from yolo_compress.measure.benchmark import model_metrics
from yolo_compress.measure.timing import (
    Timer,
    latency_onnx,
    latency_torch,
    load_average,
    shipped_timer,
    throughput,
    timed_side_by_side,
    torch_timer,
)

__all__ = ["Rows", "gpu_device", "measure_rows"]

LOG = logging.getLogger(__name__)
Rows = dict[str, dict[str, dict[str, float]]]  # row name -> group (model, torch | onnx, gpu) -> numbers


def gpu_device(cfg: BenchmarkConfig) -> tuple[str | None, str | None]:
    """('cuda:<i>', None) when benchmark.device asks for a GPU that exists, else (None, why GPU timing is skipped)."""
    if not str(cfg.device).isdigit():
        return None, None
    if not torch.cuda.is_available():
        return None, f"benchmark.device={cfg.device} but CUDA is not available: GPU timing skipped"
    if int(cfg.device) >= torch.cuda.device_count():
        return None, f"benchmark.device={cfg.device} but only {torch.cuda.device_count()} GPU(s): GPU timing skipped"
    return f"cuda:{cfg.device}", None


def _baseline_row(baseline: str, runtime: str) -> str:
    """The row a row of `runtime` is compared with: the baseline model in the same runtime, in FP32."""
    return {"torch": baseline, "onnx": f"{baseline}_fp32"}.get(runtime, f"{baseline}_{runtime}_fp32")


def measure_rows(cfg: BenchmarkConfig, models: dict[str, Path], shipped: dict[str, tuple[Path, dict[str, Any]]],
                 threads: int | None, gpu: str | None, machine: dict[str, float], notes: dict[str, Any]) -> Rows:
    """Every row's groups, the timed ones only (a row that could not be timed is left out). Adds the load average
    around the timings to `machine`, and problems and flagged rows to `notes`."""
    rows: Rows = {}
    timers: dict[str, Timer] = {}
    runtime: dict[str, str] = {}
    for name, pt in models.items():
        rows[name] = {"model": model_metrics(pt, cfg.imgsz)}
        timers[name], runtime[name] = torch_timer(pt, cfg.imgsz), "torch"
    for key, (path, meta) in shipped.items():
        try:
            timers[key], runtime[key] = shipped_timer(path, meta["runtime"], threads), meta["runtime"]
        except ModelError as err:
            notes["problems"][key] = [str(err)]
            LOG.warning("%s: %s", key, err)
            continue
        source = rows.get(meta["model"], {}).get("model") or model_metrics(meta["source"], int(meta["imgsz"]))
        rows[key] = {"model": {**{k: source[k] for k in ("params_m", "gflops", "gflops_fvcore") if k in source},
                               "size_mb": files.size_bytes(path) / 1e6, "imgsz": int(meta["imgsz"])}}
    baselines = {n: _baseline_row(cfg.baseline, rt) for n, rt in runtime.items()}
    baselines = {n: b for n, b in baselines.items() if b in timers}

    machine["load_1m_before"] = load_average()
    summary = timed_side_by_side(timers, baselines, cfg.rounds, cfg.repeats, cfg.warmup, cfg.max_spread, threads)
    machine["load_1m_after"] = load_average()
    for name, s in summary.items():
        group = {**s, "threads": machine["threads"], "throughput_batch": 1}
        group["gflops_per_s"] = rows[name]["model"]["gflops"] / (s["latency_ms_p50"] / 1e3)
        group["peak_fraction"] = group["gflops_per_s"] / machine["matmul_peak_gflops"]
        if runtime[name] == "torch":  # PyTorch also at the throughput batch (an ONNX file's batch is fixed at 1)
            group.update(throughput(models[name], cfg.imgsz, cfg.batch, cfg.warmup, cfg.repeats, threads))
        rows[name][runtime[name]] = group
        if s["flagged"]:
            notes["flagged"].append(name)
        LOG.info("%s (%s): p50 %.1f ms%s", name, runtime[name], s["latency_ms_p50"],
                 "  FLAGGED: spread over benchmark.max_spread" if s["flagged"] else "")
    if gpu:
        _gpu_rows(cfg, models, shipped, threads, gpu, rows, {n: runtime[n] for n in summary}, notes)
    return {name: groups for name, groups in rows.items() if name in summary}


def _gpu_rows(cfg: BenchmarkConfig, models: dict[str, Path], shipped: dict[str, tuple[Path, dict[str, Any]]],
              threads: int | None, gpu: str, rows: Rows, runtime: dict[str, str], notes: dict[str, Any]) -> None:
    import onnxruntime as ort

    # without ORT's CUDA provider an ONNX "GPU" timing would silently be a CPU one
    ort_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    if not ort_gpu and "onnx" in runtime.values():
        notes["gpu_onnx"] = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): ONNX files " \
                            "not timed on the GPU"
    if "openvino" in runtime.values():
        notes["gpu_openvino"] = f"benchmark.device={cfg.device} is a CUDA GPU, which OpenVINO does not run on: " \
                                "OpenVINO files timed on the CPU only"
    for name, rt in runtime.items():
        if rt == "torch":
            lat = latency_torch(models[name], cfg.imgsz, 1, cfg.warmup, cfg.repeats, device=gpu)
        elif rt == "onnx" and ort_gpu:
            lat = latency_onnx(shipped[name][0], 1, cfg.warmup, cfg.repeats, threads, device=gpu)
        else:
            continue
        rows[name]["gpu"] = {k: v for k, v in lat.items() if k != "batch"}
