"""Where the files that params.yaml names must live, so that DVC sees them change.

DVC reruns a stage when a declared dep changes, and a dvc.yaml dep must name a path. distill.teacher and
prune.model always name a .pt, so dvc.yaml templates them (`${distill.teacher}`) and they may live anywhere. The
other keys default to something that is no file (a built-in dataset, synthetic or digits; a model yaml inside
Ultralytics; no unlabeled images), so the files a user brings for them live in two folders that the reading stages
depend on as a whole.
"""

from __future__ import annotations

from pathlib import Path

from yolo_compress.config import BUILT_IN_SOURCES, Params
from yolo_compress.data.user_dataset import user_dataset_root
from yolo_compress.errors import ParamsError

DATA_SOURCES = Path("data/sources")  # datasets (data.source) and image folders (distill.unlabeled)
MODEL_STARTS = Path("models/start")  # starting .pt files and model yamls (teacher.model, student.model)


def names_a_file(model_spec: str, repo: Path = Path()) -> bool:
    """False for a model yaml that ships inside Ultralytics (`yolo11n.yaml`), True for a user's file."""
    return model_spec.endswith(".pt") or "/" in model_spec or (repo / model_spec).exists()


def user_files(params: Params, repo: Path = Path()) -> list[tuple[str, str, Path]]:
    """(params key, value, folder it must lie in) for each value that names a file the user brought."""
    found = []
    if params.data.source not in BUILT_IN_SOURCES:
        found.append(("data.source", params.data.source, DATA_SOURCES))
    if params.distill.unlabeled:
        found.append(("distill.unlabeled", params.distill.unlabeled, DATA_SOURCES))
    for key, spec in (("teacher.model", params.teacher.model), ("student.model", params.student.model)):
        if names_a_file(spec, repo):
            found.append((key, spec, MODEL_STARTS))
    return found


def _inside(path: str | Path, folder: Path, repo: Path) -> bool:
    return (repo / path).resolve().is_relative_to((repo / folder).resolve())


def check_tracked(params: Params, repo: Path = Path()) -> None:
    """ParamsError naming the key when a user's file, or the `path:` root of a user's dataset yaml, lies outside its
    folder. Paths are resolved, so a link in the folder that points outside is refused too: DVC hashes the link, not
    what it points at, and would miss an edited label."""
    for key, value, folder in user_files(params, repo):
        if not _inside(value, folder, repo):
            raise ParamsError(
                f"{key}: {value} lies outside {folder}/, so DVC would not see it change; copy it into {folder}/ "
                f"(a link is not enough: DVC does not follow links) and point {key} there, e.g. "
                f"{folder}/{Path(value).name}")
    if params.data.source in BUILT_IN_SOURCES:
        return
    dataset_root = user_dataset_root(repo / params.data.source)
    if not _inside(dataset_root, DATA_SOURCES, repo):
        raise ParamsError(
            f"data.source: the images and labels of {params.data.source} are in {dataset_root}, outside "
            f"{DATA_SOURCES}/, so DVC would not see a label change; copy the dataset into {DATA_SOURCES}/ and give "
            "its yaml a relative `path:`")
