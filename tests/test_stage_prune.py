"""The prune stage script end to end: its input checks, and one tiny real run of 2 prune + fine-tune rounds."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from yolo_compress.config import DataConfig, DistillConfig, PruneConfig, load_params
from yolo_compress.data.dataset import prepare_dataset
from yolo_compress.data.prepared import training_view
from yolo_compress.models import count_params
from yolo_compress.prune.rounds import finetune, pick_round
from yolo_compress.prune.run import kept_round, prune_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = DataConfig(image_size=64, train_images=8, val_images=4, test_images=1, test_shift_images=1)
STUDENT = {"model": "yolo11n.yaml", "imgsz": 64, "batch": 4, "workers": 0, "device": "cpu"}
PRUNE = {"rounds": 2, "target": 0.5, "importance": "l2", "finetune_epochs": 1, "last_round_epochs": None,
         "max_map_drop": 1.0}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cwd with a tiny prepared dataset and an untrained yolo11n (6 classes) saved as a plain checkpoint."""
    root = tmp_path_factory.mktemp("prune_stage")
    prepare_dataset(TINY_DATA, seed=0, root=root / "data" / "prepared")
    code = ("import sys, torch; from ultralytics.nn.tasks import DetectionModel; torch.manual_seed(0); "
            "torch.save({'model': DetectionModel('yolo11n.yaml', nc=6, verbose=False).half()}, sys.argv[1])")
    (root / "models").mkdir()
    subprocess.run([sys.executable, "-c", code, "models/distilled.pt"], cwd=root, check=True, env=env(root))
    return root


def env(root: Path) -> dict[str, str]:
    """A subprocess environment with an MLflow store in `root` and Ultralytics offline and out of the home dir.

    Set here, not inherited: module fixtures run before conftest's per-test MLflow isolation.
    """
    user = {k: v for k, v in os.environ.items() if k != "ULTRALYTICS_SAFE_LOAD"}  # set by yolo_compress.models here
    return {**user, "MLFLOW_TRACKING_URI": store(root), "DVC_ROOT": str(root), "YOLO_OFFLINE": "1",
            "YOLO_CONFIG_DIR": str(root / ".ultralytics")}


def store(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def stage_args(root: Path, prune: dict | None = None, **paths: str) -> list[str]:
    """Write params.yaml with `prune` into `root`; the stage's arguments as in dvc.yaml (overridable)."""
    (root / "params.yaml").write_text(yaml.safe_dump({"student": STUDENT, "prune": prune or PRUNE}))
    args = {"data": "data/prepared", "model": "models/distilled.pt", "teacher": "models/teacher.pt",
            "out": "models/pruned.pt", "rounds-dir": "models/prune_rounds", "control": "models/prune_control.pt",
            "metrics": "metrics/prune.json",
            "plots": "plots/prune.json", **paths}
    return [str(REPO / "stages" / "prune.py"), *(x for k, v in args.items() for x in (f"--{k}", v))]


@pytest.fixture(scope="module")
def stage_module() -> object:
    """The stage script as a module, imported once: bad-input cases run in-process instead of paying for imports."""
    spec = importlib.util.spec_from_file_location("prune_stage", REPO / "stages" / "prune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stage_main(stage_module: object) -> object:
    return stage_module.main


def test_teacher_input_distills_from_the_unpruned_model(workspace: Path, stage_module: object,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """prune.teacher input: the model being pruned is the teacher, and distill.teacher (absent here) is not read."""
    monkeypatch.chdir(workspace)
    monkeypatch.setattr(sys, "argv", stage_args(workspace, {**PRUNE, "distill": True, "teacher": "input"}))
    args = stage_module.parse_args()
    _, distill = stage_module.checked_inputs(args, load_params(args.params))
    assert not (workspace / args.teacher).exists() and distill.teacher == "models/distilled.pt"


@pytest.fixture(scope="module")
def tiny_run(workspace: Path) -> subprocess.CompletedProcess:
    """The stage run for real, once, in a fresh process: 2 rounds with 1 fine-tune epoch each."""
    cmd = [sys.executable, *stage_args(workspace)]
    return subprocess.run(cmd, cwd=workspace, env=env(workspace), capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(
    ("prune", "paths", "needle"),
    [
        ({}, {"model": "models/missing.pt"}, "prune.model: model file models/missing.pt not found"),
        ({}, {"model": "bogus.pt"}, "prune.model: bogus.pt is not a PyTorch checkpoint: neither"),
        ({"rounds": 0}, {}, "prune.rounds: expected an int >= 1, got 0"),
        ({"target": 1.0}, {}, "prune.target: expected a float in (0, 1)"),
        ({"importance": "magic"}, {}, "prune.importance: expected one of l1, l2, bn, taylor, random, got 'magic'"),
        ({"distill": True}, {}, "distill.teacher: model file models/teacher.pt not found"),
        ({"teacher": "self"}, {}, "prune.teacher: expected one of distill, input, got 'self'"),
    ],
    ids=["missing-model", "not-a-checkpoint", "rounds-0", "target-1", "importance",
         "missing-teacher", "teacher-kind"],
)
def test_bad_input_is_one_error_line_and_exit_2(workspace: Path, stage_main: object, tmp_path: Path, prune: dict,
                                                 paths: dict, needle: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("data", "models"):  # a cwd of its own, so that any work it started would show
        (tmp_path / name).symlink_to(workspace / name)
    (tmp_path / "bogus.pt").write_bytes(b"not a checkpoint")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", stage_args(tmp_path, {**PRUNE, **prune}, **paths))
    with pytest.raises(SystemExit) as exit_info:
        stage_main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1, err  # nothing but the error line
    assert err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # rejected before any work


def test_pick_round_keeps_the_most_pruned_round_not_over_the_bound() -> None:
    assert pick_round([False, False]) == 2  # none over: the last (smallest) one
    assert pick_round([False, True]) == 1  # stopped at round 2: keep round 1
    assert pick_round([True]) == 1  # none inside: round 1, the least pruned


def _round(k: int, drop: float, low: float, high: float) -> dict[str, float]:
    return {"round": k, "params_m": 1.0, "gflops": 1.0 - 0.2 * k, "map50_95_after": 0.5 - drop, "drop": drop,
            "drop_ci95_low": low, "drop_ci95_high": high, "seconds": 1.0}


def test_decisions_follow_the_drops_interval_not_its_point_value() -> None:
    cfg = PruneConfig(rounds=3, max_map_drop=0.01)
    start = _round(0, 0.0, 0.0, 0.0)
    # round 2 drops 1.7 points, over the 1-point bound, but its interval reaches below it: noise, keep going
    noisy = [start, _round(1, -0.004, -0.02, 0.01), _round(2, 0.017, -0.002, 0.035), _round(3, 0.005, -0.01, 0.02)]
    keep, warnings = kept_round(noisy, cfg)
    assert keep == 3 and warnings == []
    keep, warnings = kept_round(noisy[:3], cfg)  # had it stopped (it would not), round 2 would be kept with a note
    assert keep == 2 and any("PRUNING STOPPED after round 2 of 3" in w for w in warnings)
    assert any("within the noise" in w for w in warnings)
    sure = [start, _round(1, 0.005, -0.01, 0.02), _round(2, 0.04, 0.02, 0.06)]  # round 2 is over with confidence
    keep, warnings = kept_round(sure, cfg)
    assert keep == 1 and len(warnings) == 1 and "PRUNING STOPPED after round 2 of 3" in warnings[0]
    metrics = prune_metrics(sure, keep, cfg)["pruned"]
    assert (metrics["best_round"], metrics["stopped_early"], metrics["over_bound"]) == (1, 1, 0)
    worst = [start, _round(1, 0.05, 0.03, 0.07)]  # the only round is over: kept all the same, and said so
    keep, warnings = kept_round(worst, cfg)
    assert keep == 1 and any("KEPT ROUND 1 IS OVER THE BOUND" in w for w in warnings)
    assert prune_metrics(worst, keep, cfg)["pruned"]["over_bound"] == 1


def test_two_rounds_shrink_the_model_and_write_every_output(workspace: Path,
                                                            tiny_run: subprocess.CompletedProcess) -> None:
    assert tiny_run.returncode == 0, tiny_run.stderr[-5000:]
    assert "frozen layer" not in tiny_run.stdout + tiny_run.stderr  # fine-tune got a trainable model, no unfreezing
    rows = json.loads((workspace / "plots" / "prune.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(set(r) == {"round", "params_m", "gflops", "map50_95_before", "map50_95_after", "drop", "drop_std",
                          "drop_ci95_low", "drop_ci95_high", "seconds"} for r in rows)
    assert all(r["drop_ci95_low"] <= r["drop"] <= r["drop_ci95_high"] for r in rows[1:])
    gflops = [r["gflops"] for r in rows]
    assert gflops[0] > gflops[1] > gflops[2] > 0
    assert 0.35 < gflops[2] / gflops[0] < 0.65  # target 0.5 of FLOPs removed over the two rounds, give or take
    assert rows[0]["params_m"] > rows[1]["params_m"] > rows[2]["params_m"]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("map50_95_before", "map50_95_after"))
    assert all(r["seconds"] > 0 for r in rows)

    metrics = json.loads((workspace / "metrics" / "prune.json").read_text())
    assert set(metrics) == {"input", "pruned", "control", "ratio", "change", "time", "mlflow_run_id"}
    assert metrics["input"] == {"params_m": rows[0]["params_m"], "gflops": gflops[0],
                                "map50_95": rows[0]["map50_95_after"]}
    assert metrics["pruned"]["rounds_done"] == 2 and metrics["pruned"]["best_round"] == 2  # max_map_drop 1: no stop
    assert metrics["pruned"]["stopped_early"] == 0 and metrics["pruned"]["over_bound"] == 0
    assert metrics["pruned"]["gflops"] == gflops[2]
    assert metrics["ratio"]["gflops_removed"] == pytest.approx(1 - gflops[2] / gflops[0])
    for group, values in metrics.items():  # DVC-friendly: numbers only, at most 2 levels
        if group != "mlflow_run_id":
            assert all(isinstance(v, (int, float)) for v in values.values()), group

    rounds = workspace / "models" / "prune_rounds"
    assert sorted(p.name for p in rounds.iterdir()) == ["round_1.pt", "round_2.pt"]
    assert not list((workspace / "models").glob(".*"))  # the temp folder was renamed into place, none left over
    code = ("import sys; from ultralytics import YOLO; "
            "print(*(sum(p.numel() for p in YOLO(f).model.parameters()) for f in sys.argv[1:]))")
    files = ["models/pruned.pt", "models/prune_rounds/round_2.pt", "models/distilled.pt", "models/prune_control.pt"]
    counts = subprocess.run([sys.executable, "-c", code, *files], cwd=workspace, env=env(workspace),
                            capture_output=True, text=True, check=True).stdout.split()[-4:]
    pruned, round2, full, control = (int(c) for c in counts)
    assert pruned == round2 == round(rows[2]["params_m"] * 1e6) and pruned < 0.8 * full
    # the control: the input trained the same epochs as the kept round (1 + 1), never pruned
    assert control == full
    assert metrics["control"]["finetune_epochs"] == metrics["pruned"]["finetune_epochs"] == 2
    c = metrics["control"]
    assert c["pruned_minus_control"] == pytest.approx(metrics["pruned"]["map50_95"] - c["map50_95"])
    assert c["pruned_minus_control_ci95_low"] <= c["pruned_minus_control"] <= c["pruned_minus_control_ci95_high"]
    assert "against the control" in tiny_run.stderr + tiny_run.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(store(workspace))
    run = client.get_run(metrics["mlflow_run_id"])
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == ["round 1", "round 2"]
    assert {r.data.metrics["gflops"] for r in nested} == {gflops[1], gflops[2]}


def test_distillation_fine_tune_keeps_the_pruned_width(workspace: Path, tiny_run: subprocess.CompletedProcess,
                                                       tmp_path: Path) -> None:
    """prune.distill's trainer: the pruned student (round 1 of the run) learns from the unpruned input as teacher."""
    assert tiny_run.returncode == 0, tiny_run.stderr[-5000:]
    student, teacher = workspace / "models" / "prune_rounds" / "round_1.pt", workspace / "models" / "distilled.pt"
    data = training_view(workspace / "data" / "prepared", tmp_path / "view")
    cfg = DistillConfig(loss="cwd", teacher=str(teacher))
    best = finetune(student, data, epochs=1, imgsz=64, batch=4, lr0=0.001, work_dir=tmp_path / "ft", seed=0,
                    workers=0, device="cpu", plots=False, distill=cfg)  # raises if the width changed
    with open(best.parent.parent / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["train/dis_loss"]) > 0  # the teacher's loss was part of training
    assert float(row["dis/weight"]) == cfg.base_weight
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert not hasattr(ckpt["model"], "distill_adapters")  # a plain pruned student, adapters stripped
    assert count_params(ckpt["model"]) == count_params(torch.load(student, weights_only=False)["model"])
    assert count_params(ckpt["model"]) < count_params(torch.load(teacher, weights_only=False)["model"])


def test_the_decision_tool_reruns_the_rounds_under_another_seed(workspace: Path,
                                                               tiny_run: subprocess.CompletedProcess) -> None:
    """yolo_compress.experiments.decision_stability on tiny params: both variants run the rounds and are compared."""
    assert tiny_run.returncode == 0, tiny_run.stderr[-5000:]
    stage_args(workspace)  # params.yaml as the tiny run had it
    out = subprocess.run([sys.executable, "-m", "yolo_compress.experiments.decision_stability", "--variants",
                          "as_is", "other_seed", "--out", "decision.md"], cwd=workspace, env=env(workspace),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-5000:]
    table = (workspace / "decision.md").read_text()
    rows = [line.split(" | ")[1:3] for line in table.splitlines() if line.startswith(("| as_is", "| other_seed"))]
    assert len(rows) == 2 and rows[0] == rows[1] == ["2", "2"]  # max_map_drop 1: both run and keep every round
    assert "Same verdict under every perturbation." in table
    assert not (workspace / "models" / "prune_rounds" / "round_3.pt").exists()  # nothing written under models/
