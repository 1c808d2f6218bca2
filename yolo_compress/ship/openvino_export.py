"""OpenVINO IR files: FP32 from the exported ONNX graph, INT8 by NNCF post-training quantization.

Why a second runtime: ONNX Runtime has no quantized SiLU (each one becomes QLinearSigmoid + QLinearMul), while
OpenVINO runs SiLU inside its INT8 convolutions (docs/export-and-benchmark.md, "OpenVINO").

Both start from the same FP32 ONNX graph as the ONNX Runtime files (OpenVINO's ONNX frontend), so every runtime's file
has the same weights and input size. INT8 is `nncf.quantize` with the MIXED preset (symmetric weights, asymmetric
activations), calibrated on the same letterboxed training images as the ONNX Runtime INT8 file, with the same part
of the head in float (`export.head_decode_nodes`: the box decoding), as Ultralytics keeps it for OpenVINO INT8.

Each file is a folder `<model>_<format>_openvino_model/` holding `<model>_<format>.xml`, `.bin` and Ultralytics'
`metadata.yaml`, so `YOLO("<folder>")` runs it like Ultralytics' own OpenVINO export. Weights are saved in
float32 (OpenVINO's default would halve them to FP16).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from yolo_compress.errors import ModelError

__all__ = ["OPENVINO_FORMATS", "OpenVinoError", "ir_folder", "ir_xml", "openvino_versions", "require_openvino",
           "to_openvino"]

OPENVINO_FORMATS = ("openvino_fp32", "openvino_int8")
INSTALL = "pip install openvino nncf (the README's install command does)"


class OpenVinoError(ModelError):
    """OpenVINO or NNCF is missing, or failed on one file; one line. The stage keeps the other rows."""


def require_openvino(quantize: bool = False) -> Any:
    """The `openvino` module (and NNCF importable when `quantize`); OpenVinoError naming the package otherwise."""
    try:
        import openvino as ov
    except ImportError:
        raise OpenVinoError(f"OpenVINO is not installed; {INSTALL}, or remove the openvino_* formats from "
                            "export.formats") from None
    if quantize:
        try:
            import nncf  # noqa: F401 - only checked here, used by to_openvino
        except ImportError:
            raise OpenVinoError(f"NNCF (OpenVINO's quantizer) is not installed; {INSTALL}, or remove openvino_int8 "
                                "from export.formats") from None
    return ov


def openvino_versions() -> dict[str, str]:
    """Versions of OpenVINO and NNCF where installed (for the sidecar and the benchmark's machine notes)."""
    out = {}
    for name in ("openvino", "nncf"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def ir_folder(out_dir: str | Path, key: str) -> Path:
    """`<out_dir>/<key>_openvino_model`: the suffix is how Ultralytics' AutoBackend knows an OpenVINO folder."""
    return Path(out_dir) / f"{key}_openvino_model"


def ir_xml(folder: str | Path) -> Path:
    """The .xml of an IR folder; OpenVinoError when there is none."""
    found = sorted(Path(folder).glob("*.xml"))
    if not found:
        raise OpenVinoError(f"{folder}: no OpenVINO .xml inside; rerun `dvc repro export`")
    return found[0]


def _metadata(onnx_model: Any) -> dict[str, str]:
    return {p.key: p.value for p in onnx_model.metadata_props}


def to_openvino(fp32_onnx: str | Path, folder: str | Path, calib: Sequence[np.ndarray] | None = None,
                keep_float: Sequence[str] = ()) -> Path:
    """Convert an FP32 ONNX file to an IR folder: FP32 when `calib` is None, else INT8 calibrated on the input
    tensors `calib`, with the ONNX nodes named in `keep_float` left in float.

    The folder appears whole or not at all (written beside it, then renamed).
    """
    import onnx

    ov = require_openvino(quantize=calib is not None)
    folder = Path(folder)
    src = onnx.load(str(fp32_onnx))
    # ov.convert_model sends telemetry; read_model + constant folding (the graph's shapes are fixed) gives the same
    # graph and weights without it
    from openvino.passes import ConstantFolding, Manager

    model = ov.Core().read_model(str(fp32_onnx))
    folding = Manager()
    folding.register_pass(ConstantFolding())
    folding.run_passes(model)
    if calib is not None:
        import nncf

        nncf.set_log_level(logging.WARNING)  # its INFO lists every node it leaves unquantized
        if not calib:
            raise OpenVinoError("NNCF needs at least one calibration image; set export.calib_images >= 1")
        names = {op.get_friendly_name() for op in model.get_ops()}  # the ONNX node names, where kept
        model = nncf.quantize(model, nncf.Dataset(list(calib)), preset=nncf.QuantizationPreset.MIXED,
                              subset_size=len(calib),
                              ignored_scope=nncf.IgnoredScope(names=[n for n in keep_float if n in names],
                                                              validate=False))
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}-", dir=folder.parent) as tmp:
        made = Path(tmp) / folder.name
        made.mkdir()
        ov.save_model(model, str(made / f"{folder.name.removesuffix('_openvino_model')}.xml"), compress_to_fp16=False)
        (made / "metadata.yaml").write_text(yaml.safe_dump(_metadata(src), sort_keys=False))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(made, folder)
    return folder
