"""activation_runtimes: one real run on the tiny pipeline (SiLU pruned here, ReLU from the prune stage)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from yolo_compress.experiments.activation_runtimes import main


@pytest.mark.e2e
def test_a_real_run_tabulates_every_file_of_both_activations_in_both_runtimes(
        tiny_repo: tuple[Path, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tiny_repo[0]
    monkeypatch.chdir(root)  # params name the models by paths relative to the repo
    out = tmp_path / "activation.md"
    try:
        main(["--relu", "models/pruned.pt", "--out", str(out)])
    finally:
        shutil.rmtree(root / "runs" / "activation_runtimes", ignore_errors=True)
    rows = {line.split("|")[1].strip(" `"): line.split("|")[2:-1] for line in out.read_text().splitlines()
            if line.startswith("| `")}
    files = [f"{m}_{f}" for m in ("student", "pruned_relu", "pruned_silu")
             for f in ("fp32", "int8", "openvino_fp32", "openvino_int8")]
    assert sorted(rows) == sorted(files)
    for name, cells in rows.items():
        assert cells[0].strip() == ("OpenVINO" if "openvino" in name else "ONNX Runtime")
        assert float(cells[2]) > 0 and float(cells[3].strip(" ×")) > 0  # p50 ms, speedup
        assert all(0.0 <= float(c) <= 1.0 for c in cells[4:])  # mAP50-95 per eval split
    assert rows["student_fp32"][3].strip() == rows["student_openvino_fp32"][3].strip() == "1.00×"
