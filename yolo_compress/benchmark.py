"""Model size, FLOPs and latency (PyTorch and ONNX Runtime), measured the same way for every model.

FLOPs convention: Ultralytics' GFLOPs are thop's multiply-accumulate count × 2; fvcore counts one fused
multiply-add as one flop, so `gflops_fvcore` doubles it. Both then count one MAC as two flops, matching the
2·n³ flops of an n×n matmul that `matmul_peak_gflops` uses, so achieved GFLOP/s compare with the peak.

Latencies are only comparable within one run on one machine (2 shared CPU cores are noisy): compare models through
`speedups` of latencies measured together, and keep `machine_info` beside the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from yolo_compress.errors import ModelError
from yolo_compress.models import YOLO, count_params, load_model

__all__ = [
    "OPSET",
    "OnnxExportError",
    "default_threads",
    "gflops_fvcore",
    "gflops_ultralytics",
    "file_size_mb",
    "export_onnx",
    "latency_torch",
    "latency_onnx",
    "matmul_peak_gflops",
    "machine_info",
    "throughput",
]

OPSET = 17  # fixed so an upgrade of torch or Ultralytics does not silently change the exported graph

ModelLike = str | Path | YOLO | nn.Module


class OnnxExportError(ModelError):
    """ONNX export of one model failed; the message is one line. The stage records it and goes on."""


def _module(model: ModelLike) -> nn.Module:
    """The torch module of a .pt/.yaml path, a YOLO wrapper or a module."""
    if isinstance(model, (str, Path)):
        model = load_model(model, "model")
    if isinstance(model, YOLO):
        model = model.model
    return model


def _inference_copy(model: ModelLike, device: str = "cpu") -> nn.Module:
    """A fused (Conv+BN), fp32, eval-mode copy for timing and counting; the caller's model is untouched."""
    m = copy.deepcopy(_module(model)).float().eval()
    if hasattr(m, "fuse"):
        m = m.fuse(verbose=False)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.to(device)


def gflops_fvcore(model: ModelLike, imgsz: int) -> float:
    """GFLOPs of one image by fvcore's traced count × 2 (one MAC = 2 flops, as Ultralytics reports), fused model.

    fvcore counts convolutions, matmuls and upsampling; elementwise ops (SiLU, add) are skipped, as thop skips them.
    """
    from fvcore.nn import FlopCountAnalysis

    m = _inference_copy(model)
    x = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():  # fvcore traces with torch.jit, which inference-mode tensors break
        fca = FlopCountAnalysis(m, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return 2 * fca.total() / 1e9


def gflops_ultralytics(model: ModelLike, imgsz: int) -> float:
    """GFLOPs of one image as Ultralytics reports them (thop MACs × 2), fused model; 0.0 where thop fails."""
    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(_inference_copy(model), imgsz))


def file_size_mb(path: str | Path) -> float:
    """File size in MB (10⁶ bytes)."""
    return Path(path).stat().st_size / 1e6


# -------------------------------------------------------------------------------------------------------- ONNX


def _export(src: Path, imgsz: int, batch: int, opset: int, simplify: bool) -> Path:
    import onnx

    made = YOLO(str(src)).export(format="onnx", imgsz=imgsz, batch=batch, opset=opset, simplify=simplify,
                                 dynamic=False, device="cpu", verbose=False)
    onnx.checker.check_model(str(made))
    return Path(made)


def export_onnx(model_pt: str | Path, imgsz: int, out_path: str | Path, batch: int = 1, opset: int = OPSET,
                simplify: bool = False) -> Path:
    """Export a .pt to ONNX at a fixed input shape (batch, 3, imgsz, imgsz), offline, written atomically.

    Ultralytics' exporter writes next to the .pt, so it runs on a copy in a temp folder beside `out_path`.
    Raises OnnxExportError (one line) when the model cannot be exported. `simplify` needs onnxslim installed
    (Ultralytics would otherwise try to pip-install it): checked first, one line.
    """
    model_pt, out_path = Path(model_pt), Path(out_path)
    if not model_pt.is_file():
        raise ModelError(f"{model_pt}: model file not found; train it first or fix the path")
    if simplify and importlib.util.find_spec("onnxslim") is None:
        raise OnnxExportError(f"{model_pt}: ONNX export with simplify needs onnxslim; `pip install onnxslim` or set "
                              "export.simplify: false")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        src = tmp / "model.pt"
        shutil.copyfile(model_pt, src)
        try:
            with _torch_threads(torch.get_num_threads()):  # the exporter resets torch's thread count
                made = _export(src, imgsz, batch, opset, simplify)
        except Exception as err:  # noqa: BLE001 - torch.onnx, onnx and Ultralytics raise many types
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise OnnxExportError(f"{model_pt}: ONNX export failed: {reason}") from err
        os.replace(made, out_path)
        return out_path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ latency


def default_threads() -> int:
    """CPUs this process may use: the thread count every timing uses unless told otherwise.

    Not torch's current setting: any Ultralytics train/val/export call resets that to cpu_count - 1.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[int]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


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

    `threads` sets torch's intra-op threads for the measurement only (None: default_threads()).
    """
    m = _inference_copy(model, device)
    x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    times: list[float] = []
    with _torch_threads(threads) as n, torch.inference_mode():
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

    `threads` is ORT's intra-op thread count (None: default_threads(), as for torch, so both runtimes get the
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
    return _summary(times, batch, threads or default_threads())


def matmul_peak_gflops(seconds: float = 1.0, n: int = 1024, threads: int | None = None, device: str = "cpu") -> float:
    """Best fp32 n×n matmul rate in GFLOP/s (2·n³ flops each) over about `seconds`: this machine's practical peak."""
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    best = float("inf")
    with _torch_threads(threads), torch.inference_mode():
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
        "threads": str(default_threads()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------------------ summary


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


def model_metrics(model_pt: str | Path, imgsz: int) -> dict[str, float]:
    """Size and FLOPs of a checkpoint: params as saved, GFLOPs (Ultralytics and fvcore) of the fused model, file MB."""
    model = _inference_copy(model_pt)
    return {
        "params_m": count_params(_module(model_pt)) / 1e6,  # as saved (Conv and BN apart), like model_size()
        "gflops": gflops_ultralytics(model, imgsz),
        "gflops_fvcore": gflops_fvcore(model, imgsz),
        "size_mb": file_size_mb(model_pt),
        "imgsz": imgsz,
    }


# ---------------------------------------------------------------------------------------- interleaved timing

Timer = Callable[[], float]


def torch_timer(model: ModelLike, imgsz: int, device: str = "cpu") -> Timer:
    """One batch-1 forward of a fused fp32 eval copy per call, returning its seconds (run under inference_mode)."""
    m = _inference_copy(model, device)
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
    opts.intra_op_num_threads = threads or default_threads()
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


def interleaved(timers: Mapping[str, Timer], rounds: int, repeats: int,
                warmup: int = 5) -> dict[str, list[list[float]]]:
    """Seconds per row and round: each round times every row `repeats` times, rows in an order rotated per round
    (distill_overhead.rotated), so drift in the machine's load hits every row alike. Warm-up runs are untimed."""
    from yolo_compress.distill_overhead import rotated

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
    (distill_overhead.round_ratios), with its min, max and relative spread (interquartile range / median). `flagged`
    is 1 when the spread (of the speedup; of the latency for a row without a baseline) exceeds `max_spread`."""
    from yolo_compress.distill_overhead import round_ratios

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
    `threads`: torch's intra-op threads meanwhile (None: default_threads(); ONNX sessions carry their own)."""
    with _torch_threads(threads):
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
