"""The project's pretrained starts: trained on tiny synthetic data, recorded with a weights hash that the same seed
gives again on this machine, loadable as a start; bad arguments are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yolo_compress.experiments.pretrain_starts import main, weights_sha256
from yolo_compress.experiments.study import planned_code, start_files
from yolo_compress.experiments.study_plan import StudyPart, plan_part
from yolo_compress.models import load_model

TINY = ["--models", "yolo11n.yaml", "--epochs", "1", "--imgsz", "64", "--train-images", "4", "--val-images", "2",
        "--batch", "2"]


def test_starts_are_recorded_by_weights_and_reproduced_from_the_seed(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main([*TINY, "--out-dir", "a", "--record", "a.json"])
    main([*TINY, "--out-dir", "b", "--record", "b.json"])
    record = json.loads(Path("a.json").read_text())
    start = record["starts"]["synthetic_yolo11n.pt"]
    assert record["seed"] == 0 and record["epochs"] == 1 and record["data"]["image_size"] == 64
    assert start["model"] == "yolo11n.yaml" and 0 <= start["val_map50_95"] <= 1
    assert start["weights_sha256"] == weights_sha256("a/synthetic_yolo11n.pt")
    again = json.loads(Path("b.json").read_text())["starts"]["synthetic_yolo11n.pt"]
    assert again["weights_sha256"] == start["weights_sha256"]  # same seed, same machine: same weights
    assert load_model("a/synthetic_yolo11n.pt", "student.model").task == "detect"

    # a study experiment that starts from it: the start's weights are part of what its record must match
    part = StudyPart(schedules={"short": 1}, losses=["logit"], seeds=[0],
                     params={"student.model": "a/synthetic_yolo11n.pt", "teacher.model": "yolo11s.yaml",
                             "distill.teacher": "gone/teacher.pt"})
    p = plan_part("d", part)[0]
    # yolo11s.yaml is Ultralytics' own; a start not on this machine cannot be hashed here (None: not compared)
    assert start_files(p.overrides) == ["a/synthetic_yolo11n.pt", "gone/teacher.pt"]
    assert planned_code(p, {"distill": {"stages/distill.py": "x"}}) == {
        "stages/distill.py": "x", "a/synthetic_yolo11n.pt": start["weights_sha256"], "gone/teacher.pt": None}


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "0"], "error: --epochs: expected an int >= 1, got 0"),
    (["--imgsz", "100"], "error: --imgsz: expected a multiple of 32, got 100"),
])
def test_bad_arguments_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                    args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not Path("models").exists() and not Path("reports").exists()
