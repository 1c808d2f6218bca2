"""The summary report: built only from metrics files, deterministic, best values marked, problems shown."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from yolo_compress.errors import UserError
from yolo_compress.ship.report import build_summary, prune_ratio, recommend
from yolo_compress.ship.report_inputs import load_inputs, missing_report_keys
from yolo_compress.ship.report_plots import _pareto_points, pareto_front, plot_pareto, plot_prune_curve
from yolo_compress.tracking.runs import log_artifacts_to_parent

from .conftest import REPO

EVAL = {  # model -> val / test mAP50-95 and mAP50
    "teacher": {"val": (0.60, 0.80), "test": (0.58, 0.79)},
    "student": {"val": (0.40, 0.61), "test": (0.39, 0.60)},
    "distilled": {"val": (0.45, 0.66), "test": (0.43, 0.64)},
    "pruned": {"val": (0.42, 0.63), "test": (0.41, 0.62)},
}
BENCH = {  # model -> gflops, params_m, size_mb, torch p50
    "teacher": (3.5, 9.4, 19.0, 60.0),
    "student": (1.1, 2.6, 5.4, 20.0),
    "distilled": (1.1, 2.6, 5.4, 21.0),
    "pruned": (0.55, 1.2, 2.6, 11.0),
}


def write_metrics(root: Path, evaluate: dict = EVAL, bench: dict = BENCH, prune: bool = True) -> Path:
    """A metrics folder (and notes / prune plots beside it) as the stages write them."""
    m = root / "metrics"
    (m / "evaluate").mkdir(parents=True)
    (m / "benchmark").mkdir()
    for name, splits in evaluate.items():
        doc = {s: {"map50_95": v[0], "map50": v[1], "precision": 0.7, "recall": 0.6} for s, v in splits.items()}
        (m / "evaluate" / f"{name}.json").write_text(json.dumps({**doc, "mlflow_run_id": "abc"}))
    base = bench["student"]
    for name, (gf, pm, mb, tl) in bench.items():
        doc = {"model": {"gflops": gf, "params_m": pm, "size_mb": mb},
               "torch": {"latency_ms_p50": tl, "latency_ms_p90": tl * 1.2, "speedup_vs_student": base[3] / tl}}
        (m / "benchmark" / f"{name}.json").write_text(json.dumps(doc))
    (m / "benchmark" / "machine.json").write_text(json.dumps({"threads": 2, "matmul_peak_gflops": 41.5}))
    notes = {"machine": {"cpu_model": "Test CPU", "torch": "2.x"},
             "problems": {"pruned": ["ONNX export failed: unsupported op | Foo"]}}
    (root / "notes.json").write_text(json.dumps(notes))
    (m / "student.json").write_text(json.dumps({"teacher_gap": {"map50_95": 0.004, "teacher_clearly_better": 0}}))
    if prune:
        (m / "prune.json").write_text(json.dumps({"ratio": {"gflops_removed": 0.5}}))
        rounds = [{"round": 1, "gflops": 0.8, "map50_95_after": 0.44}, {"round": 2, "gflops": 0.55,
                                                                        "map50_95_after": 0.42}]
        (root / "prune_plots.json").write_text(json.dumps(rounds))
    return m


def summary(root: Path) -> str:
    return build_summary(load_inputs(root / "metrics", root / "prune_plots.json", root / "notes.json"))


def row(md: str, model: str) -> list[str]:
    line = next(li for li in md.splitlines() if li.startswith(f"| {model} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def header(md: str) -> list[str]:
    return [c.strip() for c in next(li for li in md.splitlines() if li.startswith("| model |")).strip("|").split(" | ")]


def test_same_inputs_give_identical_bytes_and_a_changed_number_changes_the_text(tmp_path: Path) -> None:
    m = write_metrics(tmp_path)
    first = summary(tmp_path)
    assert summary(tmp_path) == first
    assert "metrics/evaluate/*.json" in first and "do not edit" in first
    doc = json.loads((m / "evaluate" / "pruned.json").read_text())
    doc["test"]["map50_95"] = 0.123
    (m / "evaluate" / "pruned.json").write_text(json.dumps(doc))
    second = summary(tmp_path)
    assert second != first
    assert row(second, "pruned")[header(second).index("test mAP50-95")] == "0.123"
    assert row(first, "pruned")[header(first).index("test mAP50-95")] == "0.410"


def test_rows_columns_and_best_values_in_bold(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    md = summary(tmp_path)
    cols = header(md)
    assert cols[:5] == ["model", "val mAP50", "val mAP50-95", "test mAP50", "test mAP50-95"]
    assert {"GFLOPs", "params (M)", "size MB", "torch p50 ms", "file p50 ms", "torch speedup vs student",
            "file speedup vs student FP32, same runtime", "prune ratio", "notes"} <= set(cols)
    rows = {name: row(md, name) for name in ("teacher", "student", "distilled", "pruned")}
    at = cols.index
    assert rows["teacher"][at("val mAP50-95")] == "**0.600**"  # higher is better
    assert rows["student"][at("val mAP50-95")] == "0.400"
    assert rows["pruned"][at("GFLOPs")] == "**0.55**"  # lower is better
    assert rows["pruned"][at("torch p50 ms")] == "**11.0**"
    assert rows["pruned"][at("torch speedup vs student")] == "**1.82×**"
    assert rows["student"][at("file p50 ms")] == "–"  # a checkpoint's row has no shipped-file timing
    assert rows["student"][at("GFLOPs")] == rows["distilled"][at("GFLOPs")] == "1.10"
    assert rows["pruned"][at("prune ratio")] == "50.0%" and rows["student"][at("prune ratio")] == "–"
    assert "Distillation** (distilled − student, mAP50-95): val +0.050, test +0.040." in md
    assert "| 2 | 0.55 | 0.42 |" in md  # the prune rounds table


def test_a_distilled_pose_model_below_the_student_is_not_presented_as_a_gain(tmp_path: Path) -> None:
    """The study's pose part: box mAP rose but keypoint AP (what pose is judged on) fell on every split."""
    m = write_metrics(tmp_path)
    for name, pose in {"student": (0.30, 0.28), "distilled": (0.27, 0.25)}.items():
        doc = json.loads((m / "evaluate" / f"{name}.json").read_text())
        for split, value in zip(("val", "test"), pose, strict=True):
            doc[split]["pose_map50_95"] = value
        (m / "evaluate" / f"{name}.json").write_text(json.dumps(doc))
    md = summary(tmp_path)
    assert ("Distillation** (distilled − student, OKS keypoint AP): val -0.030, test -0.030. **No gain: the "
            "distilled model is not better than the plain student on any split; ship the student.**") in md
    doc = json.loads((m / "evaluate" / "distilled.json").read_text())
    doc["val"]["pose_map50_95"] = 0.31
    (m / "evaluate" / "distilled.json").write_text(json.dumps(doc))
    assert "val +0.010, test -0.030. Not better than the plain student on test." in summary(tmp_path)


def test_a_column_where_every_model_ties_has_no_bold(tmp_path: Path) -> None:
    write_metrics(tmp_path, bench={n: (1.0, 2.6, 5.4, t) for n, (_, _, _, t) in BENCH.items()})
    md = summary(tmp_path)
    cols = header(md)
    for name in BENCH:
        assert row(md, name)[cols.index("GFLOPs")] == "1.00"
    assert row(md, "pruned")[cols.index("torch p50 ms")] == "**11.0**"  # the other columns still mark theirs


def test_splits_come_from_the_files_and_a_model_scored_on_fewer_shows_dashes(tmp_path: Path) -> None:
    """evaluate.splits defaults to the splits the data has: a dataset without test_shift (or test) gives no column
    for it, and a model missing a split (scored before a split was added) gets dashes, not an error."""
    evaluate = {**EVAL, "teacher": {"val": EVAL["teacher"]["val"]}}
    write_metrics(tmp_path, evaluate=evaluate)
    md = summary(tmp_path)
    cols = header(md)
    assert [c for c in cols if "mAP" in c] == ["val mAP50", "val mAP50-95", "test mAP50", "test mAP50-95"]
    assert row(md, "teacher")[cols.index("test mAP50-95")] == "–"
    assert row(md, "teacher")[cols.index("val mAP50-95")] == "**0.600**"
    assert row(md, "distilled")[cols.index("test mAP50-95")] == "**0.430**"  # best among the models that have it
    only_val = tmp_path / "only_val"
    write_metrics(only_val, evaluate={n: {"val": v["val"]} for n, v in EVAL.items()})
    md = summary(only_val)
    assert [c for c in header(md) if "mAP" in c] == ["val mAP50", "val mAP50-95"]
    assert "Distillation** (distilled − student, mAP50-95): val +0.050." in md
    plot_pareto(load_inputs(only_val / "metrics"), only_val / "pareto.png")
    assert (only_val / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_onnx_group_shows_the_reason_and_teacher_gap_in_notes(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    md = summary(tmp_path)
    cols = header(md)
    pruned = row(md, "pruned")
    assert pruned[cols.index("file p50 ms")] == "–"
    assert pruned[cols.index("notes")] == "ONNX export failed: unsupported op \\| Foo"  # pipe escaped
    assert "teacher not clearly better" in row(md, "teacher")[cols.index("notes")]
    assert row(md, "student")[cols.index("notes")] == ""


def test_missing_optional_inputs_render_with_a_note_and_missing_evaluate_is_an_error(tmp_path: Path) -> None:
    m = write_metrics(tmp_path, prune=False)
    (m / "student.json").unlink()
    md = summary(tmp_path)
    assert "## Missing inputs" in md and "prune.json: prune ratio not shown" in md
    assert "## Prune rounds" not in md
    assert row(md, "pruned")[header(md).index("prune ratio")] == "–"
    for f in (m / "evaluate").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="no evaluate metrics"):
        load_inputs(m)


def test_prune_ratio_reads_the_keys_it_documents() -> None:
    assert prune_ratio({"ratio": {"gflops_removed": 0.3}}) == 0.3
    assert prune_ratio({"pruned": {"map50_95": 0.4}}) is None and prune_ratio(None) is None


def test_pareto_front() -> None:
    pts = {"a": (10.0, 0.5), "b": (20.0, 0.6), "c": (30.0, 0.55), "d": (10.0, 0.4)}
    assert pareto_front(pts) == ["a", "b"]  # c: slower and worse than b; d: as fast as a but worse


def test_plots_are_pngs_and_deterministic(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    inp = load_inputs(tmp_path / "metrics", tmp_path / "prune_plots.json", tmp_path / "notes.json")
    for i in (1, 2):
        plot_pareto(inp, tmp_path / f"pareto{i}.png")
        plot_prune_curve(inp, tmp_path / f"prune{i}.png")
    for name in ("pareto", "prune"):
        data = (tmp_path / f"{name}1.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert (tmp_path / f"{name}2.png").read_bytes() == data
    inp.prune_rounds = None
    plot_prune_curve(inp, tmp_path / "empty.png")  # the stage's declared out must exist even without rounds
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store for this module's tests: creating one costs ~10 s of migrations on 2 cores."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_artifacts_also_go_to_the_pipeline_parent_run(tmp_path: Path, store: str) -> None:
    mlflow.set_tracking_uri(store)
    client = MlflowClient(store)
    exp = client.create_experiment("parent-test", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp).info.run_id
    f = tmp_path / "summary.md"
    f.write_text("x\n")
    with mlflow.start_run(experiment_id=exp, parent_run_id=parent):
        assert log_artifacts_to_parent([f], "report") == parent
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/summary.md"]
    with mlflow.start_run(experiment_id=exp):
        assert log_artifacts_to_parent([f], "report") is None  # by hand: no parent


def test_report_stage_writes_every_output_and_logs_its_run(tmp_path: Path, store: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    write_metrics(tmp_path)
    monkeypatch.chdir(tmp_path)  # the header names the input paths as given: relative, like dvc.yaml's
    cmd = [sys.executable, str(REPO / "stages/report.py"), "--params", str(REPO / "params.yaml"), "--metrics-dir",
           "metrics", "--prune-plots",
           "prune_plots.json", "--benchmark-notes", "notes.json", "--out", "reports/summary.md", "--pareto",
           "reports/pareto.png", "--prune-curve", "reports/prune.png"]
    proc = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = build_summary(load_inputs(Path("metrics"), "prune_plots.json", "notes.json"))
    assert Path("reports/summary.md").read_text() == expected
    assert Path("reports/pareto.png").stat().st_size > 0 and Path("reports/prune.png").stat().st_size > 0
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("yolo-compress")
    (run,) = client.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'report'")
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "report")) == [
        "report/pareto.png", "report/prune.png", "report/summary.md"]


def test_report_stage_without_evaluate_metrics_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("report_stage", REPO / "stages/report.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["report.py", "--params", str(REPO / "params.yaml"), "--metrics-dir", "nowhere",
                                      "--out", "s.md", "--pareto", "p.png", "--prune-curve", "c.png"])
    with pytest.raises(SystemExit) as info:
        stage.main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: nowhere/evaluate: no evaluate metrics (<model>.json); run `dvc repro evaluate` first"]
    assert not list(tmp_path.iterdir())  # nothing written


SHIPPED = {  # row -> test mAP50-95, p50 ms in its runtime, flagged
    "student_fp32": (0.39, 12.0, 0),
    "student_int8": (0.38, 7.0, 0),
    "pruned_fp32": (0.41, 6.0, 0),
    "pruned_int8": (0.405, 3.0, 1),  # fastest, but its timing spread was over the bound
    "distilled_int8": (0.40, 4.0, 0),
}


def write_shipped(root: Path, shipped: dict = SHIPPED) -> None:
    """Evaluate and benchmark files of shipped rows, as the stages write them, beside write_metrics' ones: ONNX
    Runtime rows (speedup against student_fp32), OpenVINO rows `*_openvino_*` (against student_openvino_fp32)."""
    m = root / "metrics"
    for name, (acc, lat, flagged) in shipped.items():
        doc = {"val": {"map50_95": acc + 0.01, "map50": 0.6}, "test": {"map50_95": acc, "map50": 0.6,
                                                                         "map50_95_lost": 0.43 - acc}}
        (m / "evaluate" / f"{name}.json").write_text(json.dumps(doc))
        rt, base = ("openvino", "student_openvino_fp32") if "openvino" in name else ("onnx", "student_fp32")
        timing = {"latency_ms_p50": lat, f"speedup_vs_{base}": shipped.get(base, (0, 12.0))[1] / lat,
                  "speedup_spread": 0.5 if flagged else 0.1, "flagged": flagged}
        (m / "benchmark" / f"{name}.json").write_text(json.dumps(
            {"model": {"gflops": 1.0, "params_m": 2.0, "size_mb": 3.0}, rt: timing}))


def test_shipped_files_are_rows_the_fastest_within_the_bound_is_recommended_and_flagged_rows_greyed(
        tmp_path: Path) -> None:
    write_metrics(tmp_path)
    write_shipped(tmp_path)
    inp = load_inputs(tmp_path / "metrics", tmp_path / "prune_plots.json", tmp_path / "notes.json")
    md = build_summary(inp, max_map_drop=0.03)
    models = [li.split(" | ")[0][2:] for li in md.splitlines() if li.startswith("| ") and not li.startswith("| model")]
    assert models[:8] == ["teacher", "student", "student_fp32", "student_int8", "distilled", "distilled_int8",
                          "pruned", "pruned_fp32"]
    cols = header(md)
    flagged = row(md, "pruned_int8")
    assert flagged[cols.index("file p50 ms")] == "*3.0*"  # greyed out, never bold
    assert row(md, "distilled_int8")[cols.index("file p50 ms")] == "**4.0**"  # best among the trusted rows
    assert "timing too noisy" in flagged[cols.index("notes")]
    assert row(md, "student_int8")[cols.index("test mAP50-95 lost vs .pt")] == "0.050"
    # distilled test 0.43: within 0.03 are pruned_fp32 (0.41) and distilled_int8 (0.40); pruned_int8 is flagged
    assert recommend(inp, 0.03)[0] == "distilled_int8"
    line = recommend(inp, 0.03)[1]
    assert "`distilled_int8` (ONNX Runtime)" in line and "4.0 ms" in line
    assert "3.00× vs student_fp32 in the same runtime" in line
    assert "below the bound: student_fp32 (0.390), student_int8 (0.380)" in line
    assert "timing flagged: pruned_int8" in line
    assert line in md
    assert recommend(inp, 0.025)[0] == "pruned_fp32"  # distilled_int8 (0.40) is now 0.03 below
    assert "INT8 vs FP32 of pruned in ONNX Runtime: 2.00× faster (p50 6.0 → 3.0 ms), test mAP50-95 -0.005" in md
    assert "INT8 vs FP32 of student in ONNX Runtime: 1.71× faster" in md
    assert "This CPU" not in md  # machine.json without the flag
    inp.machine["int8_vnni"] = 0
    assert "This CPU lacks VNNI (AVX512-VNNI / AVX-VNNI)" in build_summary(inp, 0.03)
    assert recommend(inp, 0.001)[0] is None and "no shipped file is within" in recommend(inp, 0.001)[1]
    pts, runtime, split = _pareto_points(inp)
    assert runtime == "file" and split == "test" and set(pts) == set(SHIPPED)  # one point per model x format
    plot_pareto(inp, tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_an_openvino_file_is_recommended_when_it_is_the_fastest_and_compared_within_its_runtime(
        tmp_path: Path) -> None:
    """Both runtimes' rows are timed in one run, so the fastest file wins whatever its runtime; its speedup and
    INT8-vs-FP32 line are against files of the same runtime."""
    write_metrics(tmp_path)
    write_shipped(tmp_path, {**SHIPPED, "student_openvino_fp32": (0.39, 9.0, 0),
                             "pruned_openvino_fp32": (0.41, 4.5, 0), "pruned_openvino_int8": (0.405, 1.8, 0)})
    inp = load_inputs(tmp_path / "metrics", tmp_path / "prune_plots.json", tmp_path / "notes.json")
    best, line = recommend(inp, 0.03)
    assert best == "pruned_openvino_int8"
    assert "`pruned_openvino_int8` (OpenVINO)" in line and "5.00× vs student_openvino_fp32 in the same runtime" in line
    md = build_summary(inp, 0.03)
    assert "INT8 vs FP32 of pruned in OpenVINO: 2.50× faster (p50 4.5 → 1.8 ms), test mAP50-95 -0.005 (" in md
    inp.evaluate["pruned_openvino_int8"]["test"].update(map50_95_minus_fp32_ci95_low=-0.012,
                                                        map50_95_minus_fp32_ci95_high=-0.001)
    assert "test mAP50-95 -0.005 [-0.012, -0.001], outside the noise (0.410 → 0.405)" in build_summary(inp, 0.03)
    cols = header(md)
    assert row(md, "pruned_openvino_int8")[cols.index("file speedup vs student FP32, same runtime")] == "**5.00×**"
    assert "OpenVINO computing" not in md  # the notes do not say: nothing claimed
    inp.notes["machine"].update(openvino="2026.4.1", openvino_precision="bf16")
    assert "openvino 2026.4.1, OpenVINO computing in bf16 (its default on this CPU, FP32 IRs too)" in build_summary(
        inp, 0.03)


def test_missing_report_keys_asks_each_row_for_its_own_runtime_and_flag(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    write_shipped(tmp_path, {"pruned_int8": SHIPPED["pruned_int8"]})
    m = tmp_path / "metrics"
    missing = missing_report_keys(m)
    # write_metrics' PyTorch rows predate the interleaved benchmark: they have no torch.flagged
    assert f"{m}/benchmark/student.json: torch.flagged" in missing
    assert not any("pruned_int8" in line for line in missing)
    doc = json.loads((m / "benchmark" / "pruned_int8.json").read_text())
    del doc["onnx"]["flagged"]
    (m / "benchmark" / "pruned_int8.json").write_text(json.dumps(doc))
    assert f"{m}/benchmark/pruned_int8.json: onnx.flagged" in missing_report_keys(m)


def test_scores_show_their_interval_and_paired_gains_say_whether_they_are_noise(tmp_path: Path) -> None:
    m = write_metrics(tmp_path)
    for name, extra in {
        "student": {"map50_95_ci95_low": 0.36, "map50_95_ci95_high": 0.44},
        "distilled": {"map50_95_minus_student": 0.05, "map50_95_minus_student_ci95_low": 0.02,
                      "map50_95_minus_student_ci95_high": 0.08},
        "pruned": {"map50_95_minus_distilled": -0.04, "map50_95_minus_distilled_ci95_low": -0.09,
                   "map50_95_minus_distilled_ci95_high": 0.01},
    }.items():
        doc = json.loads((m / "evaluate" / f"{name}.json").read_text())
        doc["val"].update(extra)
        (m / "evaluate" / f"{name}.json").write_text(json.dumps(doc))
    grid = tmp_path / "distill_comparison.md"
    grid.write_text("# Distillation losses compared\n\nPlain student (baseline), val mAP50-95: 0.3611 ± 0.0484 "
                    "(seeds 0 1 2). ± is the std over seeds\n")
    md = build_summary(load_inputs(m, tmp_path / "prune_plots.json", tmp_path / "notes.json", seed_grid=grid))
    assert row(md, "student")[header(md).index("val mAP50-95")] == "0.400 ± 0.040"
    assert row(md, "student")[header(md).index("test mAP50-95")] == "0.390"  # no interval in its metrics: none shown
    assert "val +0.050 [+0.020, +0.080], outside the noise; test +0.040." in md
    assert "moves by 0.048 (std over 3 seeds)" in md and str(grid) in md
    assert "**Pruning** (pruned − distilled, mAP50-95; [95% paired" in md
    assert "val -0.030 [-0.090, +0.010], within the noise; test -0.020." in md


def test_each_model_shows_its_training_epochs_and_an_unmatched_pruning_gain_is_called_unchecked(
        tmp_path: Path) -> None:
    """The pruned model trained its input's epochs plus every kept round's fine-tune; with no epoch-matched control,
    a gain over the distilled model is said to be unchecked, with the number of extra epochs."""
    m = write_metrics(tmp_path, evaluate={**EVAL, "pruned": {"val": (0.48, 0.7), "test": (0.47, 0.69)}})
    for name, epochs in (("teacher", 20), ("distill", 10)):
        (m / f"{name}.json").write_text(json.dumps({"train": {"epochs": epochs, "seconds_total": 1.0}}))
    student = json.loads((m / "student.json").read_text())
    (m / "student.json").write_text(json.dumps({**student, "train": {"epochs": 10}}))
    (m / "prune.json").write_text(json.dumps({"input": {"train_epochs": 10}, "ratio": {"gflops_removed": 0.5},
                                              "pruned": {"finetune_epochs": 21}}))
    md = build_summary(load_inputs(m, tmp_path / "prune_plots.json", tmp_path / "notes.json"))
    col = header(md).index("train epochs")
    assert [row(md, n)[col] for n in ("teacher", "student", "distilled", "pruned")] == ["20", "10", "10", "31"]
    assert "**Unchecked**: the pruned model trained 21 more epochs than the distilled one" in md
    assert "Unchecked" not in build_summary(load_inputs(write_metrics(tmp_path / "loss"), None, None))


def test_with_a_control_pruning_is_judged_against_it_and_so_is_the_recommended_file(tmp_path: Path) -> None:
    """The epoch-matched control (prune_control) replaces the distilled model as the reference: the pruning line
    says what pruning lost against it, and the recommended file must be within the bound of its score."""
    m = write_metrics(tmp_path, evaluate={**EVAL, "prune_control": {"val": (0.47, 0.68), "test": (0.46, 0.67)}})
    write_shipped(tmp_path)
    pruned = json.loads((m / "evaluate" / "pruned.json").read_text())
    pruned["test"].update(map50_95_minus_prune_control=-0.05, map50_95_minus_prune_control_ci95_low=-0.07,
                          map50_95_minus_prune_control_ci95_high=-0.03)
    (m / "evaluate" / "pruned.json").write_text(json.dumps(pruned))
    (m / "prune.json").write_text(json.dumps({"input": {"train_epochs": 10}, "ratio": {"gflops_removed": 0.5},
                                              "pruned": {"finetune_epochs": 21}, "control": {"finetune_epochs": 21}}))
    inp = load_inputs(m, tmp_path / "prune_plots.json", tmp_path / "notes.json")
    md = build_summary(inp, 0.03)
    assert "**Pruning against its epoch-matched control** (pruned − prune_control" in md
    assert "test -0.050 [-0.070, -0.030], outside the noise" in md
    assert "Pruning **lost accuracy against the control** on test, outside the noise." in md
    assert "Unchecked" not in md
    col = header(md).index("train epochs")
    assert row(md, "prune_control")[col] == row(md, "pruned")[col] == "31"
    assert "epoch-matched control: the pruned model's input fine-tuned as long" in row(md, "prune_control")[-1]
    # every shipped file is over 0.03 below the control's test 0.46 (the distilled model's 0.43 would pass two)
    name, line = recommend(inp, 0.03)
    assert name is None and "of the epoch-matched control (`prune_control`" in line and "(test 0.460)" in line
    assert recommend(inp, 0.055)[0] == "pruned_fp32"
    # a control below its input (its fine-tunes hurt): the distilled model stays the reference
    inp.evaluate["prune_control"]["test"]["map50_95"] = 0.40
    name, line = recommend(inp, 0.015)
    assert name is None and "of the distilled PyTorch model, better than its epoch-matched control (test 0.430)" in line
    assert "The unpruned `distilled` is then the model to ship" in line
