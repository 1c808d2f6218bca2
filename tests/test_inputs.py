"""Files named by params.yaml must live where DVC tracks them (yolo_compress/data/inputs.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from yolo_compress.config import DataConfig, DistillConfig, Params, TrainConfig
from yolo_compress.data.inputs import check_tracked, user_files
from yolo_compress.errors import ParamsError


def dataset(folder: Path, path: str | None = None) -> Path:
    (folder / "images/train").mkdir(parents=True)
    doc = {"train": "images/train", "val": "images/train", "names": ["a"], **({"path": path} if path else {})}
    (folder / "data.yaml").write_text(yaml.safe_dump(doc))
    return folder / "data.yaml"


def with_(params: Params, **sections: object) -> Params:
    return dataclasses.replace(params, **sections)


def test_defaults_name_no_user_file(tmp_path: Path) -> None:
    assert user_files(Params()) == []
    check_tracked(Params(), tmp_path)


def test_files_inside_their_folders_pass(tmp_path: Path) -> None:
    data_yaml = dataset(tmp_path / "data/sources/mine")
    (tmp_path / "models/start").mkdir(parents=True)
    params = with_(Params(), data=DataConfig(source=str(data_yaml.relative_to(tmp_path))),
                   teacher=TrainConfig(model="models/start/yolo11s.pt"),
                   distill=DistillConfig(unlabeled="data/sources/extra"))
    assert [k for k, _, _ in user_files(params)] == ["data.source", "distill.unlabeled", "teacher.model"]
    check_tracked(params, tmp_path)


@pytest.mark.parametrize(("section", "value", "expected"), [
    ("teacher", "/abs/yolo11s.pt", "teacher.model: /abs/yolo11s.pt lies outside models/start/, so DVC would not see "
     "it change; copy it into models/start/ (a link is not enough: DVC does not follow links) and point "
     "teacher.model there, e.g. models/start/yolo11s.pt"),
    ("student", "my_arch.yaml", None),  # a file in the working directory, not a yaml inside Ultralytics
    ("distill", "images/extra", "distill.unlabeled: images/extra lies outside data/sources/"),
])
def test_a_file_outside_its_folder_is_one_line(tmp_path: Path, section: str, value: str,
                                               expected: str | None) -> None:
    (tmp_path / "my_arch.yaml").write_text("nc: 1\n")
    field = {"teacher": "model", "student": "model", "distill": "unlabeled"}[section]
    params = with_(Params(), **{section: dataclasses.replace(getattr(Params(), section), **{field: value})})
    with pytest.raises(ParamsError) as err:
        check_tracked(params, tmp_path)
    assert str(err.value).startswith(expected or "student.model: my_arch.yaml lies outside models/start/")


def test_a_link_that_leads_outside_is_refused(tmp_path: Path) -> None:
    outside = dataset(tmp_path / "outside")
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/linked").symlink_to(outside.parent)
    params = with_(Params(), data=DataConfig(source="data/sources/linked/data.yaml"))
    with pytest.raises(ParamsError, match="data.source: data/sources/linked/data.yaml lies outside data/sources/"):
        check_tracked(params, tmp_path)


def test_a_dataset_whose_path_leads_outside_is_refused(tmp_path: Path) -> None:
    images = tmp_path / "shared/ds"
    images.mkdir(parents=True)
    data_yaml = dataset(tmp_path / "data/sources/mine", path=str(images))
    params = with_(Params(), data=DataConfig(source=str(data_yaml.relative_to(tmp_path))))
    with pytest.raises(ParamsError) as err:
        check_tracked(params, tmp_path)
    assert str(err.value) == (
        f"data.source: the images and labels of data/sources/mine/data.yaml are in {images}, outside data/sources/, "
        "so DVC would not see a label change; copy the dataset into data/sources/ and give its yaml a relative "
        "`path:`")
