"""The export stage on tiny models: ONNX and OpenVINO FP32 and INT8 files, their sidecars, pruned shapes, and bad
input rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ultralytics.nn.tasks import DetectionModel

from yolo_compress import files
from yolo_compress.config import DataConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.errors import ModelError
from yolo_compress.measure.benchmark import inference_copy
from yolo_compress.measure.timing import onnx_timer
from yolo_compress.models import YOLO
from yolo_compress.prune.channel_pruning import prune_round
from yolo_compress.prune.rounds import save_pruned
from yolo_compress.ship.export import (
    SIDECAR_KEYS,
    ExportError,
    calibration_images,
    check_loads,
    exported_files,
    quantize_int8,
)

from .conftest import REPO

TINY_DATA = {"image_size": 64, "train_images": 3, "val_images": 2, "test_images": 1, "test_shift_images": 1}
FORMATS = ["fp32", "int8", "openvino_fp32", "openvino_int8"]
EXPORT = {"models": ["student", "pruned"], "formats": FORMATS, "imgsz": 64, "calib_images": 3}
CMD = [sys.executable, str(REPO / "stages" / "export.py"), "--data", "data/prepared", "--models-dir", "models",
       "--out-dir", "models/export", "--metrics", "metrics/export.json"]


def busy_model(path: Path, nc: int = 6) -> Path:
    """A random yolo11n whose detections differ from box to box: a fresh model's identical BNs and its head's bias
    init give every anchor the same whole-image box at a score near 0; random BN statistics and sharper head convs
    (what training would do) give varied boxes and scores, so FP32 and INT8 detections can be told apart."""
    from .test_pruning import randomize_bn

    model = YOLO("yolo11n.yaml")
    model.model = DetectionModel("yolo11n.yaml", nc=nc, verbose=False)
    randomize_bn(model.model)
    head = model.model.model[-1]
    for seq in (*head.cv2, *head.cv3):
        seq[-1].bias.data.zero_()
        seq[-1].weight.data *= 20
    model.model.names = {i: f"c{i}" for i in range(nc)}
    model.ckpt = {"train_args": {"task": "detect"}}
    model.save(path)
    return path


def pruned_model(path: Path, nc: int = 6) -> tuple[Path, int]:
    """yolo11n pruned once at channel ratio 0.5, saved as the prune stage saves it; and its fused parameter count."""
    model = DetectionModel("yolo11n.yaml", nc=nc, verbose=False)
    model.names = {i: f"c{i}" for i in range(nc)}
    prune_round(model, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)), 0.5, "l2",
                target="channels")
    save_pruned(model, path)
    return path, sum(p.numel() for p in inference_copy(path).parameters())


def run_export(root: Path, **export: object) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["export"].update({**EXPORT, **export})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DVC_ROOT": str(root)}
    return subprocess.run(CMD, cwd=root, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A repo-like folder (data/prepared, a random student, a pruned model) after one export stage run."""
    root = tmp_path_factory.mktemp("export")
    prepare_dataset(DataConfig(**TINY_DATA), 0, root / "data" / "prepared")
    (root / "models").mkdir()
    busy_model(root / "models" / "student.pt")
    _, pruned_params = pruned_model(root / "models" / "pruned.pt")
    proc = run_export(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "pruned_params": pruned_params, "stderr": proc.stderr}


def onnx_params(path: Path) -> int:
    import onnx

    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def test_export_writes_fp32_and_a_smaller_int8_with_sidecars_and_metrics(work: dict) -> None:
    root = work["root"]
    shipped = exported_files(root / "models/export")
    assert sorted(shipped) == sorted(f"{m}_{f}" for m in ("student", "pruned") for f in FORMATS)
    for name in ("student", "pruned"):
        for prefix in ("", "openvino_"):
            fp32, int8 = (files.size_bytes(shipped[f"{name}_{prefix}{fmt}"][0]) for fmt in ("fp32", "int8"))
            assert int8 < 0.55 * fp32  # int8 weights: about a quarter, plus scales and the float head decode
        folder, side = shipped[f"{name}_openvino_int8"]
        assert folder.name == f"{name}_openvino_int8_openvino_model" and side["runtime"] == "openvino"
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["metadata.yaml", f"{name}_openvino_int8.xml", f"{name}_openvino_int8.bin"])
        assert side["calib_images"] == 3 and side["versions"]["openvino"] and side["versions"]["nncf"]
    side = shipped["pruned_int8"][1]
    assert set(SIDECAR_KEYS) <= set(side)
    assert side["format"] == "int8" and side["calib_images"] == 3 and side["opset"] == 17 and side["imgsz"] == 64
    assert side["source_md5"] == __import__("hashlib").md5((root / "models/pruned.pt").read_bytes()).hexdigest()
    assert shipped["pruned_fp32"][1]["calib_images"] == 0
    metrics = json.loads((root / "metrics/export.json").read_text())
    assert set(metrics) == {*shipped, "mlflow_run_id"}
    for key, group in metrics.items():
        if key != "mlflow_run_id":  # dvc metrics: numbers only, two levels
            assert set(group) == {"size_mb", "seconds"} and group["size_mb"] > 0 and group["seconds"] > 0
    assert json.loads((root / "models/export/notes.json").read_text())["problems"] == {}


def test_pruned_model_exports_with_its_pruned_shapes(work: dict, tmp_path: Path) -> None:
    """The ONNX file carries the pruned widths (not the full-width yolo11n the checkpoint's yaml describes)."""
    root = work["root"]
    pruned, student = onnx_params(root / "models/export/pruned_fp32.onnx"), onnx_params(
        root / "models/export/student_fp32.onnx")
    # initializers = the fused convs (BN folded in) plus a few small constants of the head's decoding
    assert pruned == pytest.approx(work["pruned_params"], rel=0.02)
    assert pruned < 0.6 * student


def test_int8_detections_overlap_the_fp32_ones_on_a_fixed_image(work: dict) -> None:
    root = work["root"]
    image = sorted((root / "data/prepared/images/val").glob("*.png"))[0]

    def detect(fmt: str) -> tuple[np.ndarray, np.ndarray]:
        model = YOLO(str(root / f"models/export/student_{fmt}.onnx"), task="detect")  # as a user runs the file
        r = model.predict(str(image), imgsz=64, conf=0.25, verbose=False)[0]
        return r.boxes.xyxy.numpy(), r.boxes.cls.numpy()

    b32, c32 = detect("fp32")
    assert len(b32) >= 5
    assert twins(b32, c32, *detect("int8"), 0.7) >= 0.8


def twins(b1: np.ndarray, c1: np.ndarray, b2: np.ndarray, c2: np.ndarray, min_iou: float) -> float:
    """The fraction of the first boxes that have a box of the same class in the second set at `min_iou` or more."""
    from ultralytics.utils.metrics import box_iou

    if not len(b2):
        return 0.0
    iou = box_iou(torch.as_tensor(b1), torch.as_tensor(b2)).numpy()
    return float(((iou >= min_iou) & (c1[:, None] == c2[None])).any(1).mean())


def test_openvino_folders_run_in_ultralytics_like_the_onnx_files(work: dict) -> None:
    """`YOLO(folder)` runs the OpenVINO files as Ultralytics' own OpenVINO export: the FP32 one finds the ONNX FP32
    file's boxes (nearly: on a CPU with AVX512-BF16 OpenVINO computes in bf16 by default, a fraction of a pixel off),
    the INT8 one most of them."""
    root = work["root"]
    image = sorted((root / "data/prepared/images/val").glob("*.png"))[0]

    def detect(path: Path) -> tuple[np.ndarray, np.ndarray]:
        r = YOLO(str(path), task="detect").predict(str(image), imgsz=64, conf=0.25, verbose=False)[0]
        return r.boxes.xyxy.numpy(), r.boxes.cls.numpy()

    b32, c32 = detect(root / "models/export/student_fp32.onnx")
    assert len(b32) >= 5
    assert twins(b32, c32, *detect(root / "models/export/student_openvino_fp32_openvino_model"), 0.9) >= 0.9
    assert twins(b32, c32, *detect(root / "models/export/student_openvino_int8_openvino_model"), 0.7) >= 0.8


def test_openvino_int8_quantizes_the_convs_and_keeps_the_box_decoding_in_float(work: dict) -> None:
    """Every conv's weights are stored in int8 and activations pass FakeQuantize nodes; the head's decoding (DFL
    softmax, anchor arithmetic) has none in front of it, as in the ONNX Runtime INT8 file."""
    import openvino as ov

    folder = work["root"] / "models/export/pruned_openvino_int8_openvino_model"
    ops = {op.get_friendly_name(): op for op in ov.Core().read_model(str(next(folder.glob("*.xml")))).get_ops()}

    def int8_weights(conv: object) -> bool:  # decompression: i8 Constant -> Convert (-> Subtract) -> Multiply
        node = conv.input_value(1).get_node()
        while node.get_type_name() in ("Multiply", "Subtract", "Convert"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant" and node.get_element_type() == ov.Type.i8

    convs = [op for op in ops.values() if op.get_type_name() == "Convolution"]
    assert len(convs) > 50 and all(map(int8_weights, convs))
    assert sum(op.get_type_name() == "FakeQuantize" for op in ops.values()) > 50
    assert not any(v.get_node().get_type_name() == "FakeQuantize" for v in ops["/model.23/dfl/Softmax"].input_values())


def int8_weight_extremes(path: Path) -> tuple[int, int]:
    """The smallest and largest int8 value among a quantized ONNX file's int8 initializers (the conv weights)."""
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)


def test_int8_reduce_range_quantizes_the_weights_to_7_bits(work: dict, tmp_path: Path) -> None:
    """The default (params.yaml) ships 7-bit weights and says so; `false` uses the whole int8 range."""
    root = work["root"]
    assert json.loads((root / "models/export/pruned_int8.json").read_text())["reduce_range"] is True
    lo, hi = int8_weight_extremes(root / "models/export/pruned_int8.onnx")
    assert -64 <= lo and hi <= 64 and max(-lo, hi) == 64  # per-channel: each channel's extreme weight hits the edge
    calib = calibration_images(root / "data/prepared/images/train", 3)
    quantize_int8(root / "models/export/pruned_fp32.onnx", tmp_path / "full.onnx", calib, 64, reduce_range=False)
    lo, hi = int8_weight_extremes(tmp_path / "full.onnx")
    assert max(-lo, hi) == 127


def test_bad_rows_are_one_line_each_and_keep_the_other_rows(work: dict, tmp_path: Path) -> None:
    root = tmp_path / "w"
    root.mkdir()
    (root / "data").symlink_to(work["root"] / "data")
    (root / "models").mkdir()
    (root / "models/student.pt").symlink_to(work["root"] / "models/student.pt")
    # no pruned.pt, and more calibration images than the 3 training images
    proc = run_export(root, calib_images=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING yolo_compress.ship.export")]
    assert warnings == [
        "WARNING yolo_compress.ship.export: pruned: export.models lists 'pruned' but models/pruned.pt does not exist; "
        "make it with `dvc repro prune` or remove 'pruned' from export.models",
        *(f"WARNING yolo_compress.ship.export: student: {fmt}: export.calib_images is 4 but "
          "data/prepared/images/train holds 3 training images; set it between 1 and 3"
          for fmt in ("int8", "openvino_int8"))]
    assert sorted(exported_files(root / "models/export")) == ["student_fp32", "student_openvino_fp32"]
    notes = json.loads((root / "models/export/notes.json").read_text())["problems"]
    assert sorted(notes) == ["pruned", "student"]


@pytest.mark.parametrize(("export", "needle"), [
    ({"formats": ["fp32", "int4"]}, "export.formats: expected a non-empty list of distinct names from fp32, int8, "
                                    "fp16, openvino_fp32, openvino_int8, got ['fp32', 'int4']"),
    ({"calib_images": 0}, "export.calib_images: expected an int >= 1 (training images for int8 calibration), got 0"),
])
def test_bad_params_stop_the_stage_with_one_line(export: dict, needle: str, tmp_path: Path) -> None:
    proc = run_export(tmp_path, **export)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: params.yaml: {needle}"]


def test_a_file_onnx_runtime_cannot_load_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "student_int8.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(ExportError, match=r"^ONNX Runtime cannot load .*student_int8\.onnx: ") as info:
        check_loads(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match=r"^ONNX Runtime cannot load .*rerun `dvc repro export`$"):
        onnx_timer(bad)
    with pytest.raises(ExportError, match="export.calib_images is 0 but .* holds 0 training images"):
        calibration_images(tmp_path / "none", 0)
