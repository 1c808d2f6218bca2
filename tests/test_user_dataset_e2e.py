"""A user dataset with train/val/test and no test_shift, a user's starting checkpoint and a user's teacher, through
the real `dvc repro` (minutes on 2 cores); then `dvc status` must see each of those files change.

Before evaluate.splits defaulted to the splits the data has, this trained every model and then stopped in evaluate
on the missing test_shift; a model that cannot fit the dataset stopped only in its own stage, hours later. Before
data.source and the model files were DVC deps, an edited label or a replaced teacher left `dvc status` "up to date".
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from .tiny_pipeline import MODELS, copy_repo, edited_params, run

pytestmark = pytest.mark.e2e


def user_dataset(prepared: Path, dst: Path) -> Path:
    """An Ultralytics dataset (images/<split>, labels/<split>, data.yaml) made of a prepared root's train/val/test."""
    summary = json.loads((prepared / "dataset.json").read_text())
    for split in ("train", "val", "test"):
        for kind in ("images", "labels"):
            shutil.copytree(prepared / kind / split, dst / kind / split)
    doc = {"train": "images/train", "val": "images/val", "test": "images/test", "names": summary["names"]}
    (dst / "data.yaml").write_text(yaml.safe_dump(doc))
    return dst / "data.yaml"


def test_user_dataset_without_test_shift_runs_to_the_report(tiny_repo: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    root, env = copy_repo(tiny_repo[0], tmp_path / "repo"), tiny_repo[1]
    data_yaml = user_dataset(root / "data/prepared", root / "data/sources/user").relative_to(root)
    # a starting checkpoint for the teacher, and a distillation teacher kept outside the repo
    shutil.copyfile(root / "models/student.pt", root / "models/start/start.pt")
    own_teacher = tmp_path / "elsewhere/teacher.pt"
    own_teacher.parent.mkdir()
    shutil.copyfile(root / "models/teacher.pt", own_teacher)

    def use_user_data(teacher: str) -> Callable[[dict], None]:
        def edit(params: dict) -> None:
            params["data"]["source"] = str(data_yaml)
            params["teacher"]["model"] = "models/start/start.pt"
            params["distill"]["teacher"] = teacher
        return edit

    # A distill.teacher that does not exist stops the pipeline in prepare, before any stage trains.
    with edited_params(root, use_user_data("models/no_such_teacher.pt")):
        failed = run(["dvc", "repro"], root, env, check=False)
    assert failed.returncode != 0
    assert "error: distill.teacher: model file models/no_such_teacher.pt not found" in failed.stderr + failed.stdout
    assert "Running stage 'train_teacher'" not in failed.stdout

    with edited_params(root, use_user_data(str(own_teacher))):
        run(["dvc", "repro"], root, env)
        prepare = json.loads((root / "metrics/prepare.json").read_text())
        assert set(prepare["images"]) == {"train", "val", "test"}
        for name in MODELS:
            scores = json.loads((root / f"metrics/evaluate/{name}.json").read_text())
            assert set(scores) == {"val", "test", "mlflow_run_id"}, name
            assert 0.0 <= scores["test"]["map50_95"] <= 1.0
        summary = (root / "reports/summary.md").read_text()
        assert "test mAP50-95" in summary and "test_shift" not in summary
        assert (root / "reports/pareto.png").is_file()
        assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env).stdout

        label = sorted((root / "data/sources/user/labels/train").glob("*.txt"))[0]
        label.write_text(label.read_text() + "0 0.5 0.5 0.2 0.2\n")
        assert changed_stages(root, env) == {"prepare", "distill"}  # distill reads data/sources for unlabeled images
        shutil.copyfile(root / "models/distilled.pt", root / "models/start/start.pt")
        assert changed_stages(root, env) == {"prepare", "train_teacher", "train_student", "distill"}
        shutil.copyfile(root / "models/student.pt", own_teacher)
        assert changed_stages(root, env) == {"prepare", "train_teacher", "train_student", "distill", "prune"}


def changed_stages(root: Path, env: dict[str, str]) -> set[str]:
    """The stages `dvc status` says are out of date."""
    out = run(["dvc", "status", "--json"], root, env).stdout
    return set(json.loads(out))
