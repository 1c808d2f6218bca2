"""A finished study experiment: its outputs read from git and the DVC cache, its models scored with pycocotools,
and the record (yolo_compress.experiments.study_records) written from them while they still exist."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from dvc.api import DVCFileSystem

from yolo_compress import files
from yolo_compress.config import PRUNE_CONTROL, load_params
from yolo_compress.data.prepared import load_summary, training_view
from yolo_compress.experiments.study_plan import SPLITS, Planned, StudyPart
from yolo_compress.measure.evaluation import evaluate_split_with_predictions

log = logging.getLogger("yolo_compress.experiments.study")
WORK = Path(".study")  # scratch: fetched data and models, score cache (git-ignored)


def finished_experiments() -> dict[str, str]:
    """Name -> commit of every finished DVC experiment here (any baseline; the newest wins)."""
    out = subprocess.run(["git", "for-each-ref", "--sort=committerdate", "--format=%(refname) %(objectname)",
                          "refs/exps"], capture_output=True, text=True, check=True).stdout
    # refs/exps/<baseline[:2]>/<baseline[2:]>/<name>; DVC's own refs (refs/exps/celery/stash, ...) are shorter
    return {ref.split("/")[4]: sha for ref, sha in (line.split() for line in out.splitlines())
            if ref.count("/") == 4}


class Experiment:
    """A finished experiment's files, read from git and the DVC cache at its commit."""

    def __init__(self, name: str, rev: str) -> None:
        self.name, self.rev, self.fs = name, rev, DVCFileSystem(".", rev=rev)

    def json(self, path: str) -> Any:
        return json.loads(self.fs.read_text(path))

    def md5(self, path: str) -> str:
        return str(self.fs.info(path)["md5"])

    def fetch(self, path: str, dst: Path) -> Path:
        """A local copy of a tracked output, kept under its hash (fetched once)."""
        if not dst.exists():
            tmp = dst.with_name(dst.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            self.fs.get(path, str(tmp), recursive=self.fs.isdir(path))
            tmp.rename(dst)
        return dst


class Scorer:
    """pycocotools scores of a model on the prepared splits, cached by model hash, data hash and settings."""

    def __init__(self, cache: Path = WORK / "scores.json") -> None:
        self.path = cache
        self.cache: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.is_file() else {}

    def score(self, exp: Experiment, model: str, metric: str) -> dict[str, float]:
        text = exp.fs.read_text("params.yaml")
        evaluate = json.dumps((yaml.safe_load(text) or {}).get("evaluate"), sort_keys=True)
        data_md5, model_md5 = exp.md5("data/prepared"), exp.md5(model)
        key = f"{model_md5}:{data_md5}:{evaluate}:{metric}"
        if key not in self.cache:
            path = WORK / "exp_params.yaml"
            files.write_text(path, text)
            ev = load_params(path).evaluate
            data = exp.fetch("data/prepared", WORK / "data" / data_md5)
            pt = exp.fetch(model, WORK / "models" / f"{model_md5}.pt")
            scores = {}
            for split in [s for s in SPLITS if s in load_summary(data)["images"]]:  # your data may lack test_shift
                view = training_view(data, WORK / "views" / data_md5 / split, split=split)
                result, _ = evaluate_split_with_predictions(pt, view, ev.imgsz, conf=ev.conf, iou=ev.iou,
                                                            batch=ev.batch)
                scores[split] = float(result.get(metric, 0.0))  # a pose model without detections has no pose keys
            log.info("%s %s: %s", exp.name, model, "  ".join(f"{s} {v:.4f}" for s, v in scores.items()))
            self.cache[key] = scores
            files.write_json(self.path, self.cache)
        return self.cache[key]


def make_record(p: Planned, exp: Experiment, part: StudyPart, scorer: Scorer, code: dict[str, str],
                commit: str) -> dict[str, Any]:
    """Everything the report needs from a finished experiment, read from its outputs while they exist; `commit` is
    the code's (the study's starting commit: records committed since change no code)."""

    def curve(path: str) -> list[float]:
        return [row.get(part.metric, 0.0) for row in exp.json(path)]

    record: dict[str, Any] = {
        "name": p.name, "part": p.part, "schedule": p.schedule, "loss": p.loss, "seed": p.seed, "recipe": p.recipe,
        "target": p.target, "overrides": p.overrides, "params": yaml.safe_load(exp.fs.read_text("params.yaml")),
        "code": code, "commit": commit, "metric": part.metric,
        "data_md5": exp.md5("data/prepared"), "teacher_md5": exp.md5("models/teacher.pt")}
    if p.target == "prune":
        record["scores"] = {m: scorer.score(exp, f"models/{m}.pt", part.metric)
                            for m in ("distilled", PRUNE_CONTROL, "pruned")}
        record["prune"] = {"metrics": exp.json("metrics/prune.json"), "rounds": exp.json("plots/prune.json")}
        return record
    student, distilled = exp.json("metrics/student.json"), exp.json("metrics/distill.json")
    record["scores"] = {m: scorer.score(exp, f"models/{m}.pt", part.metric)
                        for m in ("teacher", "student", "distilled")}
    record["curves"] = {"teacher": curve("plots/train_teacher.json"), "student": curve("plots/train_student.json"),
                        "distilled": curve("plots/distill.json")}
    record["seconds_per_epoch"] = {"student": student["train"]["seconds_per_epoch"],
                                   "distilled": distilled["train"]["seconds_per_epoch"]}
    record["gflops"] = {"teacher": exp.json("metrics/teacher.json")["model"]["gflops"],
                        "student": student["model"]["gflops"]}
    return record
