"""The files a user ships: ONNX FP32 (Ultralytics' exporter), ONNX INT8 (ONNX Runtime static quantization) and FP16,
and OpenVINO FP32 / INT8 folders made from the same FP32 graph (`openvino_export`).

Each file `<model>_<format>.onnx` (or folder `<model>_<format>_openvino_model/`) gets a sidecar
`<model>_<format>.json` saying how it was made (source checkpoint and its md5, format, the file's name, the runtime
that runs it, opset, input size, calibration images, library versions), so `evaluate` and `benchmark` can find,
run and describe the exported files without reading params.

INT8: QDQ format, per-channel weights (int8) and per-tensor activations (uint8: ONNX Runtime's fast U8S8 path on
x86), ranges calibrated (MinMax) on training images letterboxed exactly as Ultralytics' predictor feeds a
fixed-shape ONNX model. The head's box decoding (DFL softmax, anchor arithmetic, the final concat and sigmoid)
stays in float: quantizing pixel coordinates and the DFL distribution costs box accuracy for almost no time.

The Ultralytics metadata (names, stride, imgsz, task) is copied into the INT8 and FP16 files, so `YOLO("x.onnx")`
runs them like the FP32 one.
"""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from yolo_compress import files
from yolo_compress.config import EXPORT_FORMATS, ExportConfig
from yolo_compress.errors import ModelError
from yolo_compress.measure.benchmark import OnnxExportError, export_onnx
from yolo_compress.measure.timing import openvino_timer
from yolo_compress.ship.openvino_export import OPENVINO_FORMATS, ir_folder, openvino_versions, to_openvino

__all__ = ["ExportError", "Exported", "file_md5", "calibration_images", "letterboxed", "LetterboxReader",
           "head_decode_nodes", "quantize_int8", "convert_fp16", "check_loads", "export_model", "exported_files",
           "SIDECAR_KEYS"]

_HEAD_BRANCH = re.compile(r"(one2one_)?cv\d+\.\d+")  # /model.23/cv3.1/...: a conv branch of the head

SIDECAR_KEYS = ("model", "format", "file", "runtime", "source", "source_md5", "imgsz", "opset", "simplify",
                "calib_images", "versions")


class ExportError(ModelError):
    """One file of one model could not be made or loaded; the message is one line. The stage keeps the other rows."""


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes (what DVC uses), to tie an exported file to its checkpoint."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def calibration_images(train_dir: str | Path, n: int) -> list[Path]:
    """The first `n` training images in name order (deterministic); ExportError when the split holds fewer."""
    from ultralytics.data.utils import IMG_FORMATS

    found = sorted(p for p in Path(train_dir).glob("*") if p.suffix[1:].lower() in IMG_FORMATS)
    if n < 1 or n > len(found):
        raise ExportError(f"export.calib_images is {n} but {train_dir} holds {len(found)} training images; set it "
                          f"between 1 and {len(found)}")
    return found[:n]


def letterboxed(image: str | Path | np.ndarray, imgsz: int) -> np.ndarray:
    """(1, 3, imgsz, imgsz) float32 RGB in [0, 1]: Ultralytics' predictor input for a fixed-shape ONNX model.

    Its LetterBox with auto=False (no stride-minimal padding: the graph's shape is fixed), grey 114 borders.
    """
    import cv2
    from ultralytics.data.augment import LetterBox

    img = cv2.imread(str(image)) if not isinstance(image, np.ndarray) else image
    if img is None:
        raise ExportError(f"{image}: not a readable image; rerun prepare (dvc repro prepare)")
    img = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=img)
    return np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def _reader_base() -> type:
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class LetterboxReader(_reader_base()):  # type: ignore[misc]
    """ONNX Runtime calibration reader over image files, one letterboxed image per call."""

    def __init__(self, images: Sequence[str | Path], imgsz: int, input_name: str) -> None:
        self.images, self.imgsz, self.input_name = list(images), imgsz, input_name
        self._it: Iterator[str | Path] = iter(self.images)

    def get_next(self) -> dict[str, np.ndarray] | None:
        path = next(self._it, None)
        return None if path is None else {self.input_name: letterboxed(path, self.imgsz)}

    def rewind(self) -> None:
        self._it = iter(self.images)


def head_decode_nodes(onnx_model: Any) -> list[str]:
    """Names of the last layer's non-conv nodes outside its conv branches: the head's box (and keypoint) decoding.

    The branches (`cv2.i`, `cv3.i`, pose's `cv4.i`: convs and their SiLUs) are quantized like the backbone; the
    decoding after them stays in float, except the DFL's fixed 1x1 conv. Measured on the default pruned model,
    interleaved: the branches' SiLUs in float cost 12% of its INT8 latency (a Q/DQ pair each), the DFL conv in float
    another 14-22%; neither bought accuracy (reports/performance.md).
    """
    heads = {n.name.split("/")[1] for n in onnx_model.graph.node if n.name.startswith("/model.")}
    if not heads:
        return []
    last = max(heads, key=lambda h: int(h.split(".")[1]) if h.split(".")[1].isdigit() else -1)
    return [n.name for n in onnx_model.graph.node if n.name.startswith(f"/{last}/") and n.op_type != "Conv"
            and not _HEAD_BRANCH.fullmatch(n.name.split("/")[2])]


def _copy_metadata(src: Any, dst_path: Path) -> None:
    import onnx

    dst = onnx.load(str(dst_path))
    have = {p.key for p in dst.metadata_props}
    for prop in src.metadata_props:
        if prop.key not in have:
            dst.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(dst, str(dst_path))


def quantize_int8(fp32_path: str | Path, out_path: str | Path, images: Sequence[str | Path], imgsz: int,
                  reduce_range: bool = False) -> Path:
    """Static INT8 quantization (QDQ, per-channel) of an FP32 ONNX file, calibrated on `images`; written atomically.

    `reduce_range` quantizes the weights to 7 bits: without VNNI, x86 CPUs add pairs of uint8 x int8 products in
    int16, which 8-bit weights can overflow (ONNX Runtime's quantization docs).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    src = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=out_path.parent) as tmp:
        pre, made = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)  # shapes + fusions ORT recommends
        quantize_static(str(pre), str(made), LetterboxReader(images, imgsz, src.graph.input[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=reduce_range, nodes_to_exclude=head_decode_nodes(onnx.load(str(pre))))
        _copy_metadata(src, made)
        files.copy_file(made, out_path)
    return out_path


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """FP16 weights and activations, float32 inputs and outputs (same interface as FP32); written atomically."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src = onnx.load(str(fp32_path))
    half = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    with tempfile.TemporaryDirectory(prefix=".fp16-", dir=Path(out_path).parent) as tmp:
        made = Path(tmp) / "fp16.onnx"
        onnx.save(half, str(made))
        _copy_metadata(src, made)
        files.copy_file(made, out_path)
    return Path(out_path)


def check_loads(path: str | Path) -> None:
    """ExportError (one line) unless ONNX Runtime loads the file and runs it once on its input shape."""
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        sess.run(None, {inp.name: np.zeros([d if isinstance(d, int) else 1 for d in inp.shape], np.float32)})
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for a bad file
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ExportError(f"ONNX Runtime cannot load {path}: {reason}; rerun `dvc repro export`") from None


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import ultralytics

    return {"python": platform.python_version(), "torch": torch.__version__, "ultralytics": ultralytics.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


@dataclass
class Exported:
    """One model's export: per format the file, its size and seconds; one line per format that failed."""

    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # "<model>_<fmt>": {size_mb, seconds}
    problems: list[str] = field(default_factory=list)


def export_model(name: str, model_pt: str | Path, cfg: ExportConfig, out_dir: str | Path,
                 calib: Sequence[Path] | ExportError) -> Exported:
    """Every format of `cfg.formats` for one checkpoint into `out_dir`, each with its sidecar JSON.

    `calib` is the calibration image list, or the ExportError that choosing it raised (then INT8 fails with that
    line). FP32 is always exported first (INT8 and FP16 start from it) and kept only if asked for. A failing format
    is one line in `problems`; the other formats are still made.
    """
    out_dir, model_pt = Path(out_dir), Path(model_pt)
    res = Exported()
    md5 = file_md5(model_pt)
    common = {"model": name, "source": str(model_pt), "source_md5": md5, "imgsz": cfg.imgsz, "opset": cfg.opset,
              "simplify": cfg.simplify, "calib_images": 0, "versions": _versions()}
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=out_dir) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        t0 = time.perf_counter()
        try:
            export_onnx(model_pt, cfg.imgsz, fp32, batch=1, opset=cfg.opset, simplify=cfg.simplify)
            check_loads(fp32)
        except (OnnxExportError, ExportError) as err:
            res.problems.append(f"fp32: {' '.join(str(err).split())}; no file of {name} was made")
            return res
        fp32_seconds = time.perf_counter() - t0
        for fmt in cfg.formats:
            assert fmt in EXPORT_FORMATS  # validated by ExportConfig
            key = f"{name}_{fmt}"
            dst = ir_folder(out_dir, key) if fmt in OPENVINO_FORMATS else out_dir / f"{key}.onnx"
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            try:
                if fmt in ("int8", "openvino_int8"):
                    if isinstance(calib, ExportError):
                        raise calib
                    if not calib:
                        raise ExportError("no calibration images given; set export.calib_images >= 1")
                    extra = {"calib_images": len(calib), "calib_first": calib[0].name}
                if fmt == "fp32":
                    files.copy_file(fp32, dst)
                elif fmt == "int8":
                    quantize_int8(fp32, dst, calib, cfg.imgsz, reduce_range=cfg.int8_reduce_range)
                    extra.update(calib_method="minmax", quant_format="QDQ", per_channel=True,
                                 reduce_range=cfg.int8_reduce_range)
                elif fmt == "fp16":
                    convert_fp16(fp32, dst)
                elif fmt == "openvino_fp32":
                    to_openvino(fp32, dst)
                else:
                    import onnx

                    to_openvino(fp32, dst, [letterboxed(p, cfg.imgsz) for p in calib],
                                keep_float=head_decode_nodes(onnx.load(str(fp32))))
                    extra.update(calib_method="nncf MIXED preset", keep_float="head box decoding")
                if fmt in OPENVINO_FORMATS:
                    openvino_timer(dst)()  # compiles for the CPU and runs once, as the benchmark will
                    extra["versions"] = {**common["versions"], **openvino_versions()}
                else:
                    check_loads(dst)
            except Exception as err:  # noqa: BLE001 - onnx, ORT's quantizer, OpenVINO and NNCF raise many types
                _remove(dst)
                reason = " ".join(str(err).split())[:300] or type(err).__name__
                res.problems.append(f"{fmt}: {reason}")
                continue
            seconds = fp32_seconds + time.perf_counter() - t0  # each file's cost includes the FP32 export
            runtime = "openvino" if fmt in OPENVINO_FORMATS else "onnx"
            files.write_json(out_dir / f"{key}.json",
                             {**common, **extra, "format": fmt, "file": dst.name, "runtime": runtime})
            res.files[fmt] = dst
            res.metrics[key] = {"size_mb": files.size_bytes(dst) / 1e6, "seconds": seconds}
    return res


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def exported_files(export_dir: str | Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """`<model>_<fmt>` -> (its file or IR folder, sidecar) for every exported file that has its sidecar, by name.

    The sidecar's `runtime` says which runtime runs it: `onnx` (ONNX Runtime) or `openvino`."""
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for side in sorted(Path(export_dir).glob("*.json")):
        meta = files.read_json(side)
        if not (isinstance(meta, dict) and {"model", "format", "file"} <= set(meta)):
            continue
        path = side.parent / str(meta["file"])
        if path.exists():
            out[side.stem] = (path, {"runtime": "onnx", **meta})
    return out
