"""compare_distill: the table math on hand-made records, parsing of `dvc exp show --json`, and one tiny real queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from yolo_compress.experiments.compare_distill import (
    Record,
    experiment_name,
    format_table,
    grid_overrides,
    latest_per_run,
    main,
    mean_std,
    parse_exp_show,
    queue_status,
    summarize,
)

STUDENT = {0: 0.40, 1: 0.42, 2: 0.44}
RECORDS = [
    *(Record(f"sl2-{s}", "sl2", s, STUDENT[s], STUDENT[s] + 0.01, 2.0, 3.0, "2026-01-02") for s in STUDENT),
    Record("cwd-0", "cwd", 0, 0.40, 0.42, 2.0, 2.4, "2026-01-02"),
    Record("cwd-1", "cwd", 1, 0.42, 0.45, 2.0, 2.6, "2026-01-02"),
    Record("cwd-2", "cwd", 2, 0.44, 0.45, 2.0, 2.2, "2026-01-02"),
    Record("cwd-0-old", "cwd", 0, 0.40, 0.10, 2.0, 9.0, "2026-01-01"),  # replaced by the newer cwd-0
    Record("mgd-0", "mgd", 0, 0.40, 0.38, 2.0, 2.0, "2026-01-02"),
]


def test_mean_std_is_the_sample_std() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_latest_record_per_loss_and_seed_wins() -> None:
    kept = latest_per_run(RECORDS)
    assert len(kept) == 7 and "cwd-0-old" not in {r.name for r in kept}


def test_summary_pairs_gains_by_seed() -> None:
    rows, student = summarize(RECORDS)
    assert [r.loss for r in rows] == ["sl2", "mgd", "cwd"]  # DISTILL_LOSSES order
    assert student == pytest.approx((0.42, 0.02))
    sl2, mgd, cwd = rows
    assert sl2.seeds == [0, 1, 2] and sl2.gain_vs_reference is None
    assert sl2.gain_vs_student == pytest.approx((0.01, 0.0), abs=1e-12)
    assert sl2.time_ratio == pytest.approx((1.5, 0.0))
    assert cwd.map50_95 == pytest.approx((0.44, 0.0003 ** 0.5))
    assert cwd.gain_vs_student == pytest.approx((0.02, 0.01))  # per seed +0.02 +0.03 +0.01
    assert cwd.gain_vs_reference == pytest.approx((0.01, 0.01))  # per seed +0.01 +0.02 +0.00
    assert cwd.time_ratio == pytest.approx((1.2, 0.1))
    assert mgd.seeds == [0] and mgd.gain_vs_reference == pytest.approx((-0.03, 0.0))


def test_table_has_one_line_per_loss() -> None:
    rows, student = summarize(RECORDS)
    table = format_table(rows, student, skipped=["bad-exp"])
    assert "| cwd | 0 1 2 | 0.4400 ± 0.0173 | +0.0200 ± 0.0100 | +0.0100 ± 0.0100 | 1.20x ± 0.10 |" in table
    assert "| sl2 | 0 1 2 | 0.4300 ± 0.0200 | +0.0100 ± 0.0000 | - | 1.50x ± 0.00 |" in table
    assert "0.4200 ± 0.0200 (seeds 0 1 2)" in table and "bad-exp" in table


def _rev(name: str, loss: str, seed: Any, metrics: dict[str, Any], error: Any = None) -> dict[str, Any]:
    """One experiment entry as DVC 3.67 writes it (shape copied from a real `dvc exp show --json`)."""
    data = {"rev": "a" * 40, "timestamp": "2026-11-23T11:27:56",
            "params": {"params.yaml": {"data": {"seed": 7, "student": {"seed": seed, "epochs": 1},
                                                "distill": {"loss": loss}}}},
            "metrics": metrics, "deps": {}, "outs": {}, "meta": {}}
    return {"revs": [{"rev": "a" * 40, "name": name, "data": data, "error": error, "experiments": None}],
            "executor": None, "name": name}


def _ok(student_map: float, distill_map: float) -> dict[str, Any]:
    return {"metrics/student.json": {"data": {"val": {"map50_95": student_map}, "train": {"seconds_per_epoch": 2.0}}},
            "metrics/distill.json": {"data": {"val": {"map50_95": distill_map}, "train": {"seconds_per_epoch": 3.0},
                                              "mlflow_run_id": "abc"}}}


MISSING = {"error": {"type": "FileNotFoundError", "msg": "[Errno 2] No such file or directory"}}
SHOW = [
    {"rev": "workspace", "name": None, "data": {"rev": "workspace", "params": {}, "metrics": _ok(0.9, 0.9)},
     "error": None, "experiments": None},
    {"rev": "b" * 40, "name": "main", "data": {"params": {}, "metrics": {"metrics/student.json": MISSING}},
     "error": None, "experiments": [
         _rev("done-exp", "cwd", 1, _ok(0.30, 0.33)),
         _rev("null-seed", "sl2", None, _ok(0.30, 0.31)),
         _rev("queued-exp", "mgd", 2, {}),
         _rev("failed-exp", "logit", 3, {"metrics/student.json": MISSING, "metrics/distill.json": MISSING},
              error={"msg": "Experiment run failed", "type": ""}),
     ]},
]


def test_parse_exp_show_reads_finished_experiments_only() -> None:
    records, skipped = parse_exp_show(SHOW)
    assert [(r.name, r.loss, r.seed, r.student_map, r.distill_map, r.student_spe, r.distill_spe) for r in records] == [
        ("done-exp", "cwd", 1, 0.30, 0.33, 2.0, 3.0),
        ("null-seed", "sl2", 7, 0.30, 0.31, 2.0, 3.0),  # student.seed null -> the global seed
    ]
    assert skipped == ["queued-exp", "failed-exp"]


# ---------------------------------------------------------------------------------------------- real dvc, tiny
FAKE_STAGE = """import json, os, yaml
os.makedirs("metrics", exist_ok=True)
p = yaml.safe_load(open("params.yaml"))
seed = p["student"]["seed"]
gain = {"sl2": 0.01, "cwd": 0.03}[p["distill"]["loss"]]
json.dump({"val": {"map50_95": 0.3 + seed / 100 + gain}, "train": {"seconds_per_epoch": 3.0}},
          open("metrics/distill.json", "w"))
"""
FAKE_STUDENT = """import json, os, yaml
os.makedirs("metrics", exist_ok=True)
seed = yaml.safe_load(open("params.yaml"))["student"]["seed"]
json.dump({"val": {"map50_95": 0.3 + seed / 100}, "train": {"seconds_per_epoch": 2.0}},
          open("metrics/student.json", "w"))
"""
FAKE_DVC = """stages:
  train_student:
    cmd: python stages/student.py
    deps: [stages/student.py]
    params: [student.seed]
    metrics: [{metrics/student.json: {cache: false}}]
  distill:
    cmd: python stages/distill.py
    deps: [stages/distill.py, metrics/student.json]
    params: [student.seed, distill.loss]
    metrics: [{metrics/distill.json: {cache: false}}]
"""


def _fake_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, str]]:
    """A committed git + DVC repo of the stand-in pipeline, made the cwd; its environment for subprocesses."""
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    (repo / "stages" / "distill.py").write_text(FAKE_STAGE)
    (repo / "stages" / "student.py").write_text(FAKE_STUDENT)
    (repo / "dvc.yaml").write_text(FAKE_DVC)
    (repo / "params.yaml").write_text("seed: 0\nstudent:\n  seed: null\ndistill:\n  loss: cwd\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "x"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", env["PATH"])
    return repo, env


def test_queue_status_reads_our_names_from_dvc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo, env = _fake_repo(tmp_path, monkeypatch)
    name = experiment_name("mgd", 2, "20261129-101500")
    assert name == "mgd-seed2-20261129-101500"
    subprocess.run(["dvc", "exp", "run", "--queue", "--name", name, "-S", "distill.loss=sl2", "distill"], cwd=repo,
                   env=env, check=True, capture_output=True)
    assert queue_status(repo) == ({name: "Queued"}, 0)  # queued, no worker started


@pytest.mark.e2e
def test_grid_runs_as_real_dvc_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in pipeline with the real one's params and metrics: queue, wait and collect through real DVC."""
    repo, env = _fake_repo(tmp_path, monkeypatch)
    main(["--losses", "sl2", "cwd", "--seeds", "1", "--poll", "1", "--out", "out/table.md"])
    table = (repo / "out" / "table.md").read_text()
    assert "| sl2 | 1 | 0.3200 ± 0.0000 | +0.0100 ± 0.0000 | - | 1.50x ± 0.00 |" in table
    assert "| cwd | 1 | 0.3400 ± 0.0000 | +0.0300 ± 0.0000 | +0.0200 ± 0.0000 | 1.50x ± 0.00 |" in table
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, env=env, capture_output=True,
                                      text=True, check=True).stdout)
    records = parse_exp_show(shown)[0]
    assert sorted((r.loss, r.seed) for r in records) == [("cwd", 1), ("sl2", 1)]
    assert all(r.name.startswith(f"{r.loss}-seed1-") for r in records)  # the names the grid gave


def test_the_workspace_seed_is_not_overridden_so_its_student_is_reused() -> None:
    assert grid_overrides("mgd", 0, None, 0) == ["distill.loss=mgd"]
    assert grid_overrides("mgd", 1, None, 0) == ["distill.loss=mgd", "student.seed=1"]
    assert grid_overrides("cwd", 0, 2, 0) == ["distill.loss=cwd", "student.seed=0"]
