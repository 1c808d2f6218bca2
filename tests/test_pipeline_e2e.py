"""The real `dvc repro` of the whole pipeline on a temporary copy of the repo with tiny params (minutes on 2 cores)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from .tiny_pipeline import MODELS, STAGES, TINY, dry_run_stages, edited_params, run

pytestmark = pytest.mark.e2e


@pytest.fixture
def repo(tiny_repo: tuple[Path, dict[str, str]]) -> tuple[Path, dict[str, str]]:
    return tiny_repo


def read(repo: Path, rel: str) -> dict:
    return json.loads((repo / rel).read_text())


def test_metrics_files_have_expected_keys_and_sane_values(repo: tuple[Path, dict]) -> None:
    root, _ = repo
    prepare = read(root, "metrics/prepare.json")
    assert prepare["images"] == {"train": 12, "val": 6, "test": 4, "test_shift": 4}
    assert prepare["dataset"]["nc"] == 6
    for role in ("teacher", "student"):
        m = read(root, f"metrics/{role}.json")
        assert set(m) >= {"val", "train", "model", "mlflow_run_id"}
        assert set(m["val"]) >= {"map50_95", "map50", "precision", "recall"}
        assert all(0.0 <= v <= 1.0 for v in m["val"].values())
        assert m["train"]["seconds_per_epoch"] > 0
        assert 1.0 < m["model"]["params_m"] < 4.0 and m["model"]["gflops"] > 0 and m["model"]["size_mb"] > 1
        for section in m.values():  # dvc metrics: numbers only (the run id is the one string), <= 2 levels
            assert isinstance(section, (int, float, str)) or all(isinstance(v, (int, float)) for v in section.values())
    gap = read(root, "metrics/student.json")["teacher_gap"]
    assert gap["teacher_clearly_better"] in (0, 1)
    assert gap["map50_95"] == pytest.approx(
        read(root, "metrics/teacher.json")["val"]["map50_95"] - read(root, "metrics/student.json")["val"]["map50_95"])
    curve = read(root, "plots/train_teacher.json")
    assert [row["epoch"] for row in curve] == [1, 2]


def test_models_load_with_plain_yolo_in_a_fresh_process(repo: tuple[Path, dict]) -> None:
    root, env = repo
    code = ("from ultralytics import YOLO; import sys; m = YOLO(sys.argv[1]); "
            "print(m.task, len(m.names), sum(p.numel() for p in m.model.parameters()))")
    for role in MODELS:
        out = run([sys.executable, "-c", code, f"models/{role}.pt"], root, {**env, "YOLO_OFFLINE": "1"}).stdout
        task, nc, params = out.split()[-3:]
        assert (task, nc) == ("detect", "6") and int(params) > 1_000_000


def test_mlflow_has_one_run_per_stage_grouped_under_one_parent(repo: tuple[Path, dict]) -> None:
    root, _ = repo
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("yolo-compress")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags["dvc.stage"]: r for r in runs if r.data.tags.get("kind") == "stage"}
    assert set(stages) == STAGES
    parents = {r.data.tags["mlflow.parentRunId"] for r in stages.values()}
    assert len(parents) == 1
    for stage, role in (("train_teacher", "teacher"), ("train_student", "student")):
        r = stages[stage]
        assert read(root, f"metrics/{role}.json")["mlflow_run_id"] == r.info.run_id
        assert r.data.params["epochs"] == str(TINY[role]["epochs"])
        history = client.get_metric_history(r.info.run_id, "map50_95")
        assert [m.step for m in history] == list(range(1, TINY[role]["epochs"] + 1))
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert f"{role}.json" in artifacts and "plots" in artifacts


def test_second_repro_reruns_nothing(repo: tuple[Path, dict]) -> None:
    root, env = repo
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    before = len(client.search_runs([client.get_experiment_by_name("yolo-compress").experiment_id]))
    out = run(["dvc", "repro"], root, env).stdout
    assert "Running stage" not in out
    assert "didn't change, skipping" in out
    assert len(client.search_runs([client.get_experiment_by_name("yolo-compress").experiment_id])) == before
    assert run(["git", "status", "--porcelain", "--", "data", "models"], root, env).stdout == ""


def test_student_param_change_reruns_only_the_student(repo: tuple[Path, dict]) -> None:
    root, env = repo
    with edited_params(root, lambda p: p["student"].update(epochs=3)):
        # --dry lists the stages whose own params changed; their downstream stages follow once their outs change
        assert dry_run_stages(root, env) == {"train_student", "distill"}


def test_unknown_params_key_stops_the_pipeline_with_one_line(repo: tuple[Path, dict]) -> None:
    root, env = repo
    try:
        with edited_params(root, lambda p: p["student"].update(epoch=3)):
            # DVC tracks the whole student section, so the typo reruns its readers, which refuse it before any work
            proc = run(["dvc", "repro"], root, env, check=False)
        assert proc.returncode != 0
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error: ")]
        assert errors == [
            "error: params.yaml: unknown key 'student.epoch'; valid keys in student: model, epochs, imgsz, batch, "
            "nbs, lr0, optimizer, warmup_epochs, mosaic, close_mosaic, workers, device, amp, min_teacher_gap, seed"]
    finally:  # DVC removed train_student's outputs before running it: bring back the committed ones for the others
        run(["git", "checkout", "--", "metrics", "plots"], root, env)
        run(["dvc", "checkout", "-q"], root, env)
    assert "Running stage" not in run(["dvc", "repro", "--dry"], root, env).stdout


def test_distill_loss_change_flags_only_the_stages_that_read_distill_params(repo: tuple[Path, dict]) -> None:
    root, env = repo
    with edited_params(root, lambda p: p["distill"].update(loss="mgd")):
        assert dry_run_stages(root, env) == {"distill", "prune"}  # prune reads distill.* for prune.distill


def test_later_stages_write_reviewable_metrics_and_the_report(repo: tuple[Path, dict]) -> None:
    root, env = repo
    student = read(root, "metrics/student.json")
    distill = read(root, "metrics/distill.json")
    assert 0.0 <= distill["val"]["map50_95"] <= 1.0
    assert distill["vs_student"]["map50_95_gain"] == pytest.approx(
        distill["val"]["map50_95"] - student["val"]["map50_95"])
    assert distill["model"]["params_m"] == pytest.approx(student["model"]["params_m"])
    prune = read(root, "metrics/prune.json")
    assert prune["pruned"]["gflops"] < prune["input"]["gflops"]
    assert [row["round"] for row in read(root, "plots/prune.json")] == [0, 1, 2]
    for name in MODELS:
        ev = read(root, f"metrics/evaluate/{name}.json")
        assert {"val", "test", "test_shift"} <= set(ev)
        assert 0.0 <= ev["test"]["map50_95"] <= 1.0
        bench = read(root, f"metrics/benchmark/{name}.json")
        assert bench["torch"]["latency_ms_p50"] > 0 and bench["torch"]["flagged"] in (0, 1)
    shipped = [f"{m}_{f}" for m in ("student", "pruned")
               for f in ("fp32", "int8", "openvino_fp32", "openvino_int8")]  # export's defaults
    assert set(read(root, "metrics/export.json")) == {*shipped, "mlflow_run_id"}
    for name in shipped:  # each shipped file scored on every split, and timed beside the checkpoints, in its runtime
        ev = read(root, f"metrics/evaluate/{name}.json")
        assert {"val", "test", "test_shift"} <= set(ev) and "map50_95_lost" in ev["test"]
        rt, base = ("openvino", "student_openvino_fp32") if "openvino" in name else ("onnx", "student_fp32")
        timing = read(root, f"metrics/benchmark/{name}.json")[rt]
        assert timing["latency_ms_p50"] > 0 and timing["speedup_min"] <= timing[f"speedup_vs_{base}"]
    machine = read(root, "metrics/benchmark/machine.json")
    assert {"load_1m_before", "load_1m_after", "int8_vnni"} <= set(machine)
    summary = (root / "reports/summary.md").read_text()
    assert all(f"| {name} |" in summary for name in [*MODELS, *shipped])
    assert "**Recommended file**: " in summary
    assert (root / "reports/pareto.png").stat().st_size > 1000
    diff = run(["dvc", "metrics", "show", "--md"], root, env).stdout
    assert "metrics/evaluate/distilled.json" in diff and "test.map50_95" in diff
