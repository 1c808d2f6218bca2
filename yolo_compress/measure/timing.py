"""Latency and throughput (PyTorch, ONNX Runtime, OpenVINO), timed the same way for every model; the machine's peak.

Latencies are only comparable within one run on one machine (2 shared CPU cores are noisy): compare models through
`speedups` of latencies measured together, and keep `machine_info` beside the numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yolo_compress.devices import all_cores
from yolo_compress.errors import ModelError
from yolo_compress.measure.benchmark import ModelLike, inference_copy, torch_threads

__all__ = [
    "latency_torch",
    "latency_onnx",
    "matmul_peak_gflops",
    "machine_info",
    "throughput",
    "Timer",
    "torch_timer",
    "onnx_session",
    "onnx_timer",
    "openvino_timer",
    "shipped_timer",
    "interleaved",
    "interleaved_summary",
    "timed_side_by_side",
    "load_average",
    "cpu_has_vnni",
]


def rotated(methods: Sequence[str], round_index: int) -> list[str]:
    """`methods` rotated left by `round_index`: each method runs first once every len(methods) rounds."""
    k = round_index % len(methods)
    return [*methods[k:], *methods[:k]]


def round_ratios(times: Mapping[str, Sequence[float]], base: str) -> dict[str, list[float]]:
    """Per method, its time in each round divided by `base`'s time in the same round (one ratio per round)."""
    return {m: [t / p for t, p in zip(ts, times[base], strict=True)] for m, ts in times.items()}


def _summary(times_s: list[float], batch: int, threads: int) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "latency_ms_p50": p50,
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "latency_ms_mean": float(ms.mean()),
        "throughput_img_per_s": batch * 1e3 / p50,  # images per second at this batch
        "batch": batch,
        "threads": threads,
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def latency_torch(
    model: ModelLike,
    imgsz: int,
    batch: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """PyTorch forward latency of a fused fp32 eval copy under inference_mode: p50/p90/mean ms, images/s.

    `threads` sets torch's intra-op threads for the measurement only (None: all_cores()).
    """
    m = inference_copy(model, device)
    x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    times: list[float] = []
    with torch_threads(threads) as n, torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            m(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return _summary(times, batch, n)


def latency_onnx(
    onnx_path: str | Path,
    batch: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """ONNX Runtime latency at the model's fixed input shape: p50/p90/mean ms, images/s.

    `threads` is ORT's intra-op thread count (None: all_cores(), as for torch, so both runtimes get the
    same cores).
    """
    sess = onnx_session(onnx_path, threads, device)
    inp = sess.get_inputs()[0]
    shape = list(inp.shape)
    if isinstance(shape[0], int) and shape[0] != batch:
        raise ValueError(f"{onnx_path}: exported for batch {shape[0]}, asked to time batch {batch}; export again "
                         f"with batch={batch}")
    shape[0] = batch
    if not all(isinstance(s, int) for s in shape):
        raise ValueError(f"{onnx_path}: input shape {inp.shape} is dynamic; export with a fixed imgsz")
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    times: list[float] = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _summary(times, batch, threads or all_cores())


def matmul_peak_gflops(seconds: float = 1.0, n: int = 1024, threads: int | None = None, device: str = "cpu") -> float:
    """Best fp32 n×n matmul rate in GFLOP/s (2·n³ flops each) over about `seconds`: this machine's practical peak."""
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    best = float("inf")
    with torch_threads(threads), torch.inference_mode():
        for _ in range(2):  # warm-up: thread pool, caches, cuBLAS handles
            a @ b
        _sync(device)
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            t1 = time.perf_counter()
            best = min(best, t1 - t0)
            if t1 >= end:
                break
    return 2 * n**3 / best / 1e9


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """Where the timings were taken (strings: for MLflow params/tags, not for DVC metrics)."""
    import onnxruntime as ort

    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(all_cores()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    with contextlib.suppress(ImportError):
        import openvino

        info["openvino"] = openvino.__version__.split("-")[0]
        # OpenVINO runs an FP32 IR at this precision unless told otherwise: bf16 on CPUs with AVX512-BF16 or AMX
        info["openvino_precision"] = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------------------- throughput


def throughput(model: ModelLike, imgsz: int, batch: int, warmup: int = 5, repeats: int = 30,
               threads: int | None = None, device: str = "cpu") -> dict[str, float]:
    """PyTorch images per second at `batch`: {throughput_img_per_s, throughput_batch}. (An exported ONNX file's batch
    is fixed at export, 1, so its throughput comes from the batch-1 latency.)

    It times about as many images as a latency run of `repeats` (at least 3 batches), so a batch of 8 does not make
    the benchmark 8x longer.
    """
    reps, warm = max(3, -(-repeats // batch)), -(-warmup // batch)
    lat = latency_torch(model, imgsz, batch, warm, reps, threads, device)
    return {"throughput_img_per_s": lat["throughput_img_per_s"], "throughput_batch": batch}

# ---------------------------------------------------------------------------------------- interleaved timing

Timer = Callable[[], float]


def torch_timer(model: ModelLike, imgsz: int, device: str = "cpu") -> Timer:
    """One batch-1 forward of a fused fp32 eval copy per call, returning its seconds (run under inference_mode)."""
    m = inference_copy(model, device)
    x = torch.rand(1, 3, imgsz, imgsz, device=device)

    def once() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            m(x)
            _sync(device)
            return time.perf_counter() - t0

    return once


def onnx_session(onnx_path: str | Path, threads: int | None = None, device: str = "cpu") -> Any:
    """An ONNX Runtime session as the benchmark times it; ModelError (one line) when ORT cannot load the file.

    Its worker threads do not spin-wait between runs: the models alternate, and a spinning pool of the model just
    timed would steal the cores of the next one.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or all_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(onnx_path), opts, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for a bad file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {reason}; rerun `dvc repro export`") from None


def onnx_timer(onnx_path: str | Path, threads: int | None = None, device: str = "cpu") -> Timer:
    """One run of an exported file at its fixed input shape per call, returning its seconds."""
    sess = onnx_session(onnx_path, threads, device)
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)

    def once() -> float:
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        return time.perf_counter() - t0

    return once


def openvino_timer(folder: str | Path, threads: int | None = None) -> Timer:
    """One run of an OpenVINO IR folder on the CPU, compiled for latency (one stream) on `threads` threads (None:
    all_cores(), like the other runtimes); ModelError (one line) when OpenVINO is missing or cannot compile it."""
    try:
        import openvino as ov
    except ImportError:
        raise ModelError(f"{folder}: OpenVINO is not installed (pip install openvino, as the README's install "
                         "command does)") from None
    try:
        xml = next(Path(folder).glob("*.xml"))
        compiled = ov.Core().compile_model(str(xml), "CPU", {
            "INFERENCE_NUM_THREADS": threads or all_cores(), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False})  # pinned threads would fight the other rows' threads for the cores
        request = compiled.create_infer_request()
        shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).get_partial_shape()]
    except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types for a bad IR
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ModelError(f"OpenVINO cannot compile {folder}: {reason}; rerun `dvc repro export`") from None
    x = np.random.default_rng(0).random(shape, dtype=np.float32)

    def once() -> float:
        t0 = time.perf_counter()
        request.infer({0: x})
        return time.perf_counter() - t0

    return once


def shipped_timer(path: str | Path, runtime: str, threads: int | None = None) -> Timer:
    """The timer of an exported file in its runtime (`onnx` or `openvino`, from its sidecar)."""
    return openvino_timer(path, threads) if runtime == "openvino" else onnx_timer(path, threads)


def interleaved(timers: Mapping[str, Timer], rounds: int, repeats: int,
                warmup: int = 5) -> dict[str, list[list[float]]]:
    """Seconds per row and round: each round times every row `repeats` times, rows in an order rotated per round
    (`rotated`), so drift in the machine's load hits every row alike. Warm-up runs are untimed."""

    names = list(timers)
    for name in names:
        for _ in range(warmup):
            timers[name]()
    samples: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in rotated(names, r):
            samples[name].append([timers[name]() for _ in range(repeats)])
    return samples


def _rel_spread(values: Sequence[float]) -> float:
    """Interquartile range / median: one disturbed round (a neighbour's burst) does not flag a row, a wobbly one
    does. (max - min) over 5 short rounds flagged 6 of 8 rows of a quiet default run.)"""
    mid = statistics.median(values)
    q25, q75 = np.percentile(values, [25, 75])
    return float(q75 - q25) / mid if mid > 0 else 0.0


def interleaved_summary(samples: Mapping[str, Sequence[Sequence[float]]], baselines: Mapping[str, str],
                        max_spread: float) -> dict[str, dict[str, float]]:
    """Per row: latency p50/p90/mean over all rounds, batch-1 throughput, the spread of its per-round p50s and, for
    a row with a baseline, `speedup_vs_<baseline>` = median over rounds of baseline p50 / row p50 in the same round
    (`round_ratios`), with its min, max and relative spread (interquartile range / median). `flagged`
    is 1 when the spread (of the speedup; of the latency for a row without a baseline) exceeds `max_spread`."""

    p50s = {n: [float(np.percentile(r, 50)) for r in rounds] for n, rounds in samples.items()}
    out: dict[str, dict[str, float]] = {}
    for name, rounds in samples.items():
        ms = np.concatenate([np.asarray(r, float) for r in rounds]) * 1e3
        p50 = float(np.percentile(ms, 50))
        row = {"latency_ms_p50": p50, "latency_ms_p90": float(np.percentile(ms, 90)),
               "latency_ms_mean": float(ms.mean()), "throughput_img_per_s": 1e3 / p50, "rounds": len(rounds),
               "latency_spread": _rel_spread(p50s[name])}
        spread = row["latency_spread"]
        base = baselines.get(name)
        if base is not None and base in samples:
            # row time / baseline time per round, inverted: a speedup > 1 means faster than the baseline
            ups = [1 / r for r in round_ratios({name: p50s[name], base: p50s[base]}, base)[name]]
            row.update({f"speedup_vs_{base}": statistics.median(ups), "speedup_min": min(ups),
                        "speedup_max": max(ups), "speedup_spread": _rel_spread(ups)})
            spread = row["speedup_spread"] if name != base else spread
        row["flagged"] = int(spread > max_spread)
        out[name] = row
    return out


def timed_side_by_side(timers: Mapping[str, Timer], baselines: Mapping[str, str], rounds: int, repeats: int,
                       warmup: int, max_spread: float, threads: int | None = None) -> dict[str, dict[str, float]]:
    """`interleaved` + `interleaved_summary`, and one retry for the flagged rows: they are timed again, interleaved
    with their baselines, and keep the second measurement (`retried` = 1); a row still over the bound stays flagged.
    `threads`: torch's intra-op threads meanwhile (None: all_cores(); ONNX sessions carry their own)."""
    with torch_threads(threads):
        samples = interleaved(timers, rounds, repeats, warmup)
        summary = interleaved_summary(samples, baselines, max_spread)
        flagged = [n for n, row in summary.items() if row["flagged"]]
        if flagged:
            again = list(dict.fromkeys([*flagged, *(baselines[n] for n in flagged if n in baselines)]))
            logging.getLogger(__name__).warning("timing spread over %.2f for %s: timing them again", max_spread,
                                                ", ".join(flagged))
            samples.update(interleaved({n: timers[n] for n in again}, rounds, repeats, warmup))
            summary = interleaved_summary(samples, baselines, max_spread)
            for n in again:
                summary[n]["retried"] = 1
    for row in summary.values():
        row.setdefault("retried", 0)
    return summary


def load_average() -> float:
    """The machine's 1-minute load average (0.0 where the OS has none): recorded before and after the timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def cpu_has_vnni() -> bool:
    """Whether the CPU has the int8 dot-product instructions (AVX512-VNNI or AVX-VNNI) ORT's INT8 kernels use."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_vnni" in flags or "avx_vnni" in flags
    return False
