"""Model size, FLOPs and ONNX export, measured the same way for every model; the CPU thread count timings use.

FLOPs convention: Ultralytics' GFLOPs are thop's multiply-accumulate count × 2; fvcore counts one fused
multiply-add as one flop, so `gflops_fvcore` doubles it. Both then count one MAC as two flops, matching the
2·n³ flops of an n×n matmul that `timing.matmul_peak_gflops` uses, so achieved GFLOP/s compare with the peak.

Latency and throughput are yolo_compress.measure.timing.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from yolo_compress.devices import all_cores
from yolo_compress.errors import ModelError, raise_if_interrupted
from yolo_compress.models import YOLO, count_params, load_model

__all__ = [
    "OPSET",
    "ModelLike",
    "OnnxExportError",
    "torch_threads",
    "inference_copy",
    "gflops_fvcore",
    "gflops_ultralytics",
    "file_size_mb",
    "model_metrics",
    "export_onnx",
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


def inference_copy(model: ModelLike, device: str = "cpu") -> nn.Module:
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

    m = inference_copy(model)
    x = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():  # fvcore traces with torch.jit, which inference-mode tensors break
        fca = FlopCountAnalysis(m, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return 2 * fca.total() / 1e9


def gflops_ultralytics(model: ModelLike, imgsz: int) -> float:
    """GFLOPs of one image as Ultralytics reports them (thop MACs × 2), fused model; 0.0 where thop fails."""
    from ultralytics.utils.torch_utils import get_flops

    return float(get_flops(inference_copy(model), imgsz))


def file_size_mb(path: str | Path) -> float:
    """File size in MB (10⁶ bytes)."""
    return Path(path).stat().st_size / 1e6


def model_metrics(model_pt: str | Path, imgsz: int) -> dict[str, float]:
    """Size and FLOPs of a checkpoint: params as saved, GFLOPs (Ultralytics and fvcore) of the fused model, file MB."""
    model = inference_copy(model_pt)
    return {
        "params_m": count_params(_module(model_pt)) / 1e6,  # as saved (Conv and BN apart), like model_size()
        "gflops": gflops_ultralytics(model, imgsz),
        "gflops_fvcore": gflops_fvcore(model, imgsz),
        "size_mb": file_size_mb(model_pt),
        "imgsz": imgsz,
    }


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
            with torch_threads(torch.get_num_threads()):  # the exporter resets torch's thread count
                made = _export(src, imgsz, batch, opset, simplify)
        except Exception as err:  # noqa: BLE001 - torch.onnx, onnx and Ultralytics raise many types
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise OnnxExportError(f"{model_pt}: ONNX export failed: {reason}") from err
        raise_if_interrupted()
        os.replace(made, out_path)
        return out_path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ threads


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads (None: every core this process may use; Ultralytics' train, val and export calls
    reset torch's own setting to cpu_count - 1) for the block; yields the count, restores the old."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads or all_cores())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)

