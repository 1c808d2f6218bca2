"""Size, FLOPs, ONNX export and latency measurement on a randomly initialised yolo11n at a tiny image size."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics.utils.torch_utils import get_num_params

from yolo_compress.errors import ModelError
from yolo_compress.measure.benchmark import (
    OnnxExportError,
    export_onnx,
    file_size_mb,
    gflops_fvcore,
    gflops_ultralytics,
    inference_copy,
)
from yolo_compress.measure.timing import latency_onnx, latency_torch
from yolo_compress.models import YOLO, count_params

IMGSZ = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on 2 cores shared with other jobs, 2 OpenMP threads run ~10× slower, not 2× faster."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "n.pt"
    YOLO("yolo11n.yaml").save(path)  # random init, 80 classes, no download
    return path


def test_counts_agree_between_fvcore_and_ultralytics(model_pt: Path) -> None:
    model = YOLO(str(model_pt))
    # one count for a wrapper and its module, equal to Ultralytics' own (2,624,080 for yolo11n at 80 classes)
    assert count_params(model) == count_params(model.model) == get_num_params(model.model) == 2_624_080
    fv, ul = gflops_fvcore(model, IMGSZ), gflops_ultralytics(model, IMGSZ)
    assert fv > 0 and ul > 0
    assert abs(fv - ul) / ul < 0.3  # both count one MAC as 2 flops; measured here within 0.1%
    # FLOPs of a conv net grow with the pixel count
    assert gflops_fvcore(model, 2 * IMGSZ) == pytest.approx(4 * fv, rel=0.05)
    assert file_size_mb(model_pt) == pytest.approx(model_pt.stat().st_size / 1e6)


def test_onnx_matches_pytorch_and_runs(model_pt: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = export_onnx(model_pt, IMGSZ, tmp_path / "sub" / "n.onnx")
    assert out == tmp_path / "sub" / "n.onnx" and out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["n.onnx"]  # no temp folder or .pt copy left behind
    assert not model_pt.with_suffix(".onnx").exists()  # the exporter's default place, beside the .pt
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.inference_mode():
        ref = inference_copy(model_pt)(x)
    ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-3)  # boxes in pixels, scores in [0, 1]


def test_export_failure_is_one_line_and_named(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(OnnxExportError, match=r"broken\.pt: ONNX export failed: ") as info:
        export_onnx(bad, IMGSZ, tmp_path / "broken.onnx")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == [bad]  # nothing half-written
    with pytest.raises(ModelError, match="not found"):
        export_onnx(tmp_path / "missing.pt", IMGSZ, tmp_path / "m.onnx")


def test_latencies_are_sane(model_pt: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    lat = latency_torch(model_pt, IMGSZ, batch=2, warmup=1, repeats=5, threads=1)
    assert lat["threads"] == 1 and lat["batch"] == 2
    assert 0 < lat["latency_ms_p50"] <= lat["latency_ms_p90"]
    assert lat["throughput_img_per_s"] == pytest.approx(2e3 / lat["latency_ms_p50"])
    assert torch.get_num_threads() == threads  # restored
    onnx_file = export_onnx(model_pt, IMGSZ, tmp_path / "n.onnx", batch=2)
    assert torch.get_num_threads() == threads  # Ultralytics' exporter would reset it
    lo = latency_onnx(onnx_file, batch=2, warmup=1, repeats=5, threads=1)
    assert lo["threads"] == 1 and 0 < lo["latency_ms_p50"] <= lo["latency_ms_p90"]
    with pytest.raises(ValueError, match="batch 2"):
        latency_onnx(onnx_file, batch=1)
