"""Unlabeled digits scenes for distill.unlabeled (issue 33 c): they follow the labelled train scenes and are none of
them, and a study that names their folder reruns when the folder's images change."""

from __future__ import annotations

from pathlib import Path

import pytest

from yolo_compress.config import DataConfig
from yolo_compress.data.real_scenes import write_digit_scenes
from yolo_compress.experiments.study import planned_code, start_files, start_hash
from yolo_compress.experiments.study_plan import StudyPart, plan_part
from yolo_compress.experiments.unlabeled_digits import main, write_unlabeled_digits


def _images(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))]


def test_unlabeled_scenes_follow_the_labelled_ones_and_are_none_of_them(tmp_path: Path) -> None:
    labelled = tmp_path / "prepared"
    write_digit_scenes(labelled, DataConfig(source="digits", image_size=64, train_images=4, val_images=1,
                                            test_images=1, test_shift_images=1), seed=0)
    train = _images(labelled / "images" / "train")
    write_unlabeled_digits(tmp_path / "again", count=4, after=0, imgsz=64, seed=0)
    assert _images(tmp_path / "again") == train  # the same stream: scene i is the labelled scene i
    write_unlabeled_digits(tmp_path / "extra", count=3, after=4, imgsz=64, seed=0)
    extra = _images(tmp_path / "extra")
    assert len(extra) == 3 and len(set(extra)) == 3 and not set(extra) & set(train)
    assert not list((tmp_path / "extra").glob("*.txt")) and not (tmp_path / "extra" / "scenes").exists()


def test_a_study_input_folder_is_identified_by_its_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_unlabeled_digits(Path("data/sources/extra"), count=2, after=4, imgsz=64, seed=0)
    part = StudyPart(schedules={"short": 1}, losses=["logit"], seeds=[0],
                     params={"distill.unlabeled": "data/sources/extra", "data.source": "digits"})
    p = plan_part("u", part)[0]
    assert start_files(p.overrides) == ["data/sources/extra"]
    before = planned_code(p, {"distill": {"stages/distill.py": "x"}})["data/sources/extra"]
    assert before is not None
    write_unlabeled_digits(Path("data/sources/extra"), count=2, after=5, imgsz=64, seed=0)  # other images
    start_hash.cache_clear()
    assert planned_code(p, {"distill": {"stages/distill.py": "x"}})["data/sources/extra"] not in (before, None)


@pytest.mark.parametrize(("args", "message"), [
    (["--count", "0"], "error: --count: expected an int >= 1, got 0"),
    (["--after", "-1"], "error: --after: expected an int >= 0, got -1"),
    (["--imgsz", "32"], "error: --imgsz: expected an int in [64, 2048], got 32"),
])
def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                    message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message
    assert not (tmp_path / "out").exists()
