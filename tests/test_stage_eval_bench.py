"""stages/export.py, evaluate.py and benchmark.py run for real on a tiny dataset and two untrained yolo11n models."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from yolo_compress import files
from yolo_compress.config import DataConfig
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.measure.timing import interleaved_summary

from .conftest import REPO, random_model

MODELS = ["student", "pruned"]
FORMATS = ["fp32", "int8", "openvino_fp32", "openvino_int8"]
SHIPPED = [f"{m}_{f}" for m in MODELS for f in FORMATS]
TINY_DATA = {"image_size": 64, "train_images": 1, "val_images": 3, "test_images": 1, "test_shift_images": 1}
PARAMS = {
    "export": {"models": MODELS, "formats": FORMATS, "imgsz": 64, "calib_images": 1},
    "evaluate": {"models": MODELS, "splits": ["val"], "imgsz": 64, "batch": 4},
    # one thread: on 2 shared cores two OpenMP threads are several times slower, not faster
    "benchmark": {"models": MODELS, "baseline": "student", "imgsz": 64, "batch": 2, "warmup": 1, "repeats": 3,
                  "rounds": 3, "threads": 1},
}


def stage_cmd(name: str) -> list[str]:
    args = {
        "export": ["--data", "data/prepared", "--models-dir", "models", "--out-dir", "models/export", "--metrics",
                   "metrics/export.json"],
        "evaluate": ["--data", "data/prepared", "--models-dir", "models", "--export-dir", "models/export",
                     "--out-dir", "metrics/evaluate", "--predictions-dir", "reports/predictions"],
        "benchmark": ["--models-dir", "models", "--export-dir", "models/export", "--out-dir", "metrics/benchmark",
                      "--notes", "reports/benchmark_notes.json"],
    }[name]
    return [sys.executable, str(REPO / "stages" / f"{name}.py"), *args]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo-like folder (data/prepared, models/*.pt, params.yaml) after one run of each stage."""
    root = tmp_path_factory.mktemp("stages")
    prepare_dataset(DataConfig(**TINY_DATA), 0, root / "data" / "prepared")
    (root / "models").mkdir()
    for name in MODELS:
        random_model(root / "models" / f"{name}.pt", nc=6)  # the synthetic set's 6 classes
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in PARAMS.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = stage_env(root)
    for stage in ("export", "evaluate", "benchmark"):
        proc = subprocess.run(stage_cmd(stage), cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-3000:]}"
    return root


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DVC_ROOT": str(root), **extra}


def runtime(name: str) -> str:
    return "torch" if name in MODELS else "openvino" if "openvino" in name else "onnx"


def read(root: Path, rel: str) -> dict:
    return json.loads((root / rel).read_text())


def assert_dvc_metrics_shape(doc: dict) -> None:
    """Numbers only, at most two levels (the MLflow run id is the one top-level string)."""
    for key, section in doc.items():
        if key == "mlflow_run_id":
            assert isinstance(section, str) and len(section) == 32
        else:
            assert isinstance(section, dict) and section, key
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in section.values()), key


def test_evaluate_writes_one_metrics_file_per_model_and_shipped_file_and_the_predictions(work: Path) -> None:
    assert sorted(p.stem for p in (work / "metrics/evaluate").iterdir()) == sorted(MODELS + SHIPPED)
    gt = read(work, "data/prepared/splits/val.json")
    for name in MODELS + SHIPPED:
        doc = read(work, f"metrics/evaluate/{name}.json")
        assert_dvc_metrics_shape(doc)
        assert set(doc) == {"val", "mlflow_run_id"}
        val = doc["val"]
        assert {"map50_95", "map50", "map75", "ar100", "precision", "recall", "f1", "ultralytics_map50_95",
                "map50_95_minus_ultralytics"} <= set(val)
        assert all(0.0 <= val[k] <= 1.0 for k in ("map50_95", "map50", "precision", "recall", "f1"))
        assert val["tp"] + val["fn"] == len(gt["annotations"])
        dets = read(work, f"reports/predictions/{name}_val.json")
        assert isinstance(dets, list) and dets  # an untrained model still emits low-score boxes at conf 0.001
        assert {d["image_id"] for d in dets} <= {im["id"] for im in gt["images"]}
    assert sorted(p.name for p in (work / "reports/predictions").iterdir()) == sorted(
        f"{n}_val.json" for n in MODELS + SHIPPED)
    for name in SHIPPED:  # the accuracy a shipped file lost against its own checkpoint, on the same split
        val, pt_val = read(work, f"metrics/evaluate/{name}.json")["val"], read(
            work, f"metrics/evaluate/{name.split('_')[0]}.json")["val"]
        if runtime(name) == "openvino":  # the same FP32 graph in another runtime: the same detections, near enough
            onnx_val = read(work, f"metrics/evaluate/{name.replace('openvino_', '')}.json")["val"]
            if name.endswith("fp32"):
                assert val["map50_95"] == pytest.approx(onnx_val["map50_95"], abs=0.02)
        assert val["map50_95_lost"] == pytest.approx(pt_val["map50_95"] - val["map50_95"])
        if name.endswith("int8"):  # paired against the FP32 file of its runtime, on the same resamples
            fp32_val = read(work, f"metrics/evaluate/{name.removesuffix('int8')}fp32.json")["val"]
            assert val["map50_95_minus_fp32"] == pytest.approx(val["map50_95"] - fp32_val["map50_95"])
            assert val["map50_95_minus_fp32_ci95_low"] <= val["map50_95_minus_fp32_ci95_high"]
        assert val["map50_lost"] == pytest.approx(pt_val["map50"] - val["map50"])


def test_benchmark_times_checkpoints_and_shipped_files_side_by_side(work: Path) -> None:
    assert sorted(p.stem for p in (work / "metrics/benchmark").iterdir()) == sorted(["machine", *MODELS, *SHIPPED])
    rows = {name: read(work, f"metrics/benchmark/{name}.json") for name in MODELS + SHIPPED}
    for name, doc in rows.items():
        assert_dvc_metrics_shape(doc)
        rt = runtime(name)
        assert set(doc) == {"model", rt, "mlflow_run_id"}
        assert 0.8 < doc["model"]["params_m"] < 3.0 and doc["model"]["gflops"] > 0 and doc["model"]["size_mb"] > 0.3
        g = doc[rt]
        assert 0 < g["latency_ms_p50"] <= g["latency_ms_p90"] and g["rounds"] == 3
        assert g["throughput_img_per_s"] > 0 and g["threads"] == 1 and g["flagged"] in (0, 1)
        assert g["throughput_batch"] == (2 if rt == "torch" else 1)  # an exported graph's batch is fixed at 1
        assert 0 < g["peak_fraction"] and g["gflops_per_s"] > 0
        base = {"torch": "student", "onnx": "student_fp32", "openvino": "student_openvino_fp32"}[rt]
        assert g["speedup_min"] <= g[f"speedup_vs_{base}"] <= g["speedup_max"]
    assert rows["student"]["torch"]["speedup_vs_student"] == 1.0
    assert rows["student_fp32"]["onnx"]["speedup_vs_student_fp32"] == 1.0
    assert rows["student_openvino_fp32"]["openvino"]["speedup_vs_student_openvino_fp32"] == 1.0
    for prefix in ("", "openvino_"):
        assert rows[f"pruned_{prefix}int8"]["model"]["size_mb"] < rows[f"pruned_{prefix}fp32"]["model"]["size_mb"]
    machine = read(work, "metrics/benchmark/machine.json")
    assert machine["threads"] == 1 and machine["cpu_count"] >= 1 and machine["matmul_peak_gflops"] > 0
    assert machine["load_1m_before"] >= 0 and machine["load_1m_after"] >= 0 and machine["int8_vnni"] in (0, 1)
    notes = read(work, "reports/benchmark_notes.json")
    assert notes["problems"] == {} and notes["machine"]["cpu_model"] and notes["machine"]["torch"]
    assert notes["machine"]["openvino"]


def test_speedup_is_the_median_of_per_round_ratios_and_a_wide_spread_is_flagged() -> None:
    # seconds per round: the machine slows down in round 2 for everyone (ratios unchanged), then b wobbles
    samples = {"a": [[0.010] * 3, [0.020] * 3, [0.010] * 3], "b": [[0.005] * 3, [0.010] * 3, [0.004] * 3]}
    out = interleaved_summary(samples, {"a": "a", "b": "a"}, max_spread=0.3)
    assert out["b"]["speedup_vs_a"] == pytest.approx(2.0)  # rounds: 2.0, 2.0, 2.5
    assert (out["b"]["speedup_min"], out["b"]["speedup_max"]) == pytest.approx((2.0, 2.5))
    assert out["b"]["speedup_spread"] == pytest.approx(0.125) and out["b"]["flagged"] == 0  # IQR 2.0-2.25 / 2.0
    assert out["a"]["latency_spread"] == pytest.approx(0.5) and out["a"]["flagged"] == 1  # its p50s: 10, 20, 10 ms
    assert interleaved_summary(samples, {"b": "a"}, max_spread=0.1)["b"]["flagged"] == 1


def test_a_shipped_file_onnx_runtime_cannot_load_costs_only_its_row(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "w"
    for rel in ("data", "models", "params.yaml"):
        (shutil.copytree if (work / rel).is_dir() else shutil.copy)(work / rel, root / rel)
    (root / "models/export/pruned_int8.onnx").write_bytes(b"truncated")
    for stage in ("evaluate", "benchmark"):
        proc = subprocess.run(stage_cmd(stage), cwd=root, env=stage_env(root), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if "pruned_int8" in line and "WARNING" in line]
        assert len(lines) == 1 and "ONNX Runtime" in lines[0] and "rerun `dvc repro export`" in lines[0], lines
        assert sorted(p.stem for p in (root / f"metrics/{stage}").iterdir() if p.stem != "machine") == sorted(
            MODELS + [s for s in SHIPPED if s != "pruned_int8"])
    assert list(read(root, "reports/benchmark_notes.json")["problems"]) == ["pruned_int8"]


def test_without_openvino_the_openvino_files_cost_only_their_rows(work: Path, tmp_path: Path) -> None:
    """A machine without OpenVINO (an `openvino` package that fails to import stands in for the missing one): each
    stage says so in one line per file and keeps every other row."""
    root = tmp_path / "w"
    for rel in ("data", "models", "params.yaml"):
        (shutil.copytree if (work / rel).is_dir() else shutil.copy)(work / rel, root / rel)
    fake = tmp_path / "no_openvino" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'openvino'\")\n")
    env = stage_env(root, PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    onnx_only = [s for s in SHIPPED if runtime(s) == "onnx"]
    proc = subprocess.run(stage_cmd("export"), cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(lines) == 4 and all("OpenVINO is not installed; pip install openvino nncf" in line for line in lines)
    assert sorted(json.loads((root / "metrics/export.json").read_text())) == sorted([*onnx_only, "mlflow_run_id"])
    shutil.rmtree(root / "models/export")  # now the files exist but the runtime does not
    shutil.copytree(work / "models/export", root / "models/export")
    for stage in ("evaluate", "benchmark"):
        proc = subprocess.run(stage_cmd(stage), cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in proc.stderr.splitlines() if "WARNING" in line and "openvino" in line]
        assert len(lines) == 4 and all("OpenVINO" in line and "install" in line for line in lines), lines
        assert sorted(p.stem for p in (root / f"metrics/{stage}").iterdir() if p.stem != "machine") == sorted(
            MODELS + onnx_only)


def load_stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_stage", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_stage_main(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """Run a stage's main() in-process (its checks fail before any slow import is used); return its stderr."""
    stage = load_stage(name)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", stage_cmd(name)[1:])
    with pytest.raises(SystemExit) as info:
        stage.main()
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def copy(work: Path, tmp_path: Path) -> Path:
    """A copy of the worked folder's inputs, to break."""
    dst = tmp_path / "w"
    for rel in ("data", "models", "params.yaml", "metrics"):
        (shutil.copytree if (work / rel).is_dir() else shutil.copy)(work / rel, dst / rel)
    return dst


@pytest.mark.parametrize("stage", ["evaluate", "benchmark"])
def test_a_listed_model_without_its_file_is_one_line_naming_the_stage_that_makes_it(
        stage: str, copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (copy / "models/pruned.pt").unlink()
    before = read(copy, f"metrics/{stage}/student.json")
    err = run_stage_main(stage, copy, monkeypatch, capsys)
    assert err.strip().splitlines() == [
        f"error: {stage}.models lists 'pruned' but models/pruned.pt does not exist; make it with `dvc repro prune` "
        f"or remove 'pruned' from {stage}.models"]
    assert read(copy, f"metrics/{stage}/student.json") == before  # the previous outputs are untouched


def test_a_split_without_ground_truth_is_one_line(copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["evaluate"]["splits"] = ["val", "test"]
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    (copy / "data/prepared/splits/test.json").unlink()
    err = run_stage_main("evaluate", copy, monkeypatch, capsys).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data/prepared/splits/test.json: not found")
    assert "without ground truth" in err[0]


def test_atomic_dir_swaps_the_whole_folder_or_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with files.atomic_dir(out) as tmp:
        (tmp / "a.json").write_text("1")
        (tmp / "stale.json").write_text("1")
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        (tmp / "a.json").write_text("2")
        raise RuntimeError("stage failed half way")
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "stale.json"] and (out / "a.json").read_text() == "1"
    with files.atomic_dir(out) as tmp:
        (tmp / "a.json").write_text("3")
    assert [p.name for p in out.iterdir()] == ["a.json"]  # a model dropped from the list leaves no stale file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old folder left behind
