"""The study's plan and math, free of side effects: study.yaml's typed config, the experiment grid, the plateau
test, and the paired summary that reports/study.md shows. yolo_compress/experiments/study.py runs it over DVC's
queue."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yolo_compress.config import DISTILL_LOSSES
from yolo_compress.errors import ParamsError
from yolo_compress.experiments.compare_distill import mean_std
from yolo_compress.typed_params import build_checked

PLAIN = "plain"  # the student trained without a teacher (train_student), the baseline every loss is paired with
PRUNED = "pruned"
REFERENCE = "sl2"  # Ultralytics' native distillation: the peer the best loss must beat by more than one std
SPLITS = ("val", "test", "test_shift")


@dataclass(frozen=True)
class StudyPart:
    """One part of the study (e.g. detect on real images, or pose): a grid of DVC experiments."""

    params: dict = field(default_factory=dict)  # (dict) params.yaml overrides, dotted keys, for every experiment
    schedules: dict = field(default_factory=lambda: {"short": 10})  # (dict) schedule name -> student.epochs
    losses: list[str] = field(default_factory=lambda: [REFERENCE, "logit"])  # (list) distill.loss values
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # (list) student.seed values; gains paired by seed
    prune: dict = field(default_factory=dict)  # (dict) recipe name -> prune.* overrides; each recipe prunes the best
    # distilled model of the longest schedule (chosen on val) as one experiment; {} = no pruning
    prune_seeds: list[int] = field(default_factory=list)  # (list) seeds whose distilled model each recipe prunes,
    # all of the loss best on val (mean over seeds), so a recipe's loss has a std; [] = the one best model on val
    against: str = ""  # (str) '' or another part on the same data and teacher: its students are then paired by seed
    # with this part's (e.g. unlabeled images on against off, or 3x the epochs: plain students included then)

    def __post_init__(self) -> None:
        bad = [m for m in self.losses if m not in DISTILL_LOSSES]
        if bad or not self.losses:
            raise ParamsError(f"losses: expected a non-empty list of {', '.join(DISTILL_LOSSES)}, got {self.losses!r}")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ParamsError(f"seeds: expected a non-empty list of ints >= 0, got {self.seeds!r}")
        if not self.schedules or any(not isinstance(e, int) or isinstance(e, bool) or e < 1
                                     for e in self.schedules.values()):
            raise ParamsError(f"schedules: expected names mapped to student.epochs >= 1, got {self.schedules!r}")
        if any(not isinstance(k, str) or "." not in k for k in self.params):
            raise ParamsError(f"params: expected dotted params keys (e.g. teacher.epochs), got {list(self.params)}")
        for recipe, overrides in self.prune.items():
            if not isinstance(overrides, dict) or any(not str(k).startswith("prune.") for k in overrides):
                raise ParamsError(f"prune.{recipe}: expected a mapping of prune.* keys (e.g. prune.finetune_epochs: "
                                  f"10), or {{}} for the default recipe; got {overrides!r}")
        if any(s not in self.seeds for s in self.prune_seeds):
            raise ParamsError(f"prune_seeds: expected some of seeds {self.seeds}, got {self.prune_seeds!r}")

    @property
    def metric(self) -> str:
        """The score the part is judged on: box mAP50-95, or OKS keypoint AP for pose."""
        return "pose_map50_95" if self.params.get("data.task") == "pose" else "map50_95"

    @property
    def longest(self) -> str:
        """The schedule trained longest: the one the plateau claims are about."""
        return max(self.schedules, key=lambda s: self.schedules[s])


@dataclass(frozen=True)
class StudyConfig:
    """study.yaml: the parts, and what counts as a plateau."""

    parts: dict = field(default_factory=dict)  # (dict) part name -> StudyPart
    plateau_gain: float = 0.005  # (float) plateaued: the last quarter of the epochs gained less than this mAP50-95

    def __post_init__(self) -> None:
        if not self.parts:
            raise ParamsError("parts: expected at least one part")
        for name, part in self.parts.items():  # they become DVC experiment names
            names = [("parts", name), *((f"parts.{name}.schedules", s) for s in part.schedules),
                     *((f"parts.{name}.prune", r) for r in part.prune)]
            for what, value in names:
                if not re.fullmatch(r"[A-Za-z0-9_]+", str(value)):
                    raise ParamsError(f"{what}: expected names of letters, digits and _, got {value!r}")
        for name, part in self.parts.items():
            if part.against and (part.against == name or part.against not in self.parts):
                others = [p for p in self.parts if p != name]
                raise ParamsError(f"parts.{name}.against: expected '' or another part ({', '.join(others) or 'none'})"
                                  f", got {part.against!r}")
        if not 0 < self.plateau_gain < 1:
            raise ParamsError(f"plateau_gain: expected a float in (0, 1), got {self.plateau_gain!r}")


def load_study(path: str | Path) -> StudyConfig:
    """Parse and validate study.yaml; ParamsError names the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; pass --config or run from the repo root")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        parts_raw = raw.get("parts") if isinstance(raw, dict) else None
        if not isinstance(parts_raw, dict) or not parts_raw:
            raise ParamsError("parts: expected a mapping of part names to parts")
        parts = {name: build_checked(StudyPart, part, f"parts.{name}.") for name, part in parts_raw.items()}
        return build_checked(StudyConfig, {**raw, "parts": parts}, "")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


# ------------------------------------------------------------------------------------------------------ the grid
@dataclass(frozen=True)
class Planned:
    """One DVC experiment of the study."""

    name: str
    part: str
    schedule: str
    loss: str  # distill.loss of the distilled model (for a prune experiment: of the model it prunes)
    seed: int
    overrides: dict[str, Any]  # `dvc exp run -S key=value`
    target: str  # the dvc.yaml stage the experiment runs up to
    recipe: str | None = None  # a prune experiment's recipe (StudyPart.prune); None for a distill experiment


def experiment_name(part: str, schedule: str, loss: str, seed: int) -> str:
    return f"study-{part}-{schedule}-{loss}-s{seed}"


def plan_part(name: str, part: StudyPart) -> list[Planned]:
    """One `distill` experiment per (schedule, loss, seed); each also trains that seed's plain student, which DVC's
    run cache shares between the losses (as the teacher is shared by all)."""
    out = []
    for schedule, epochs in part.schedules.items():
        for seed in part.seeds:
            for loss in part.losses:
                overrides = {**part.params, "student.epochs": epochs, "student.seed": seed, "distill.loss": loss}
                out.append(Planned(experiment_name(name, schedule, loss, seed), name, schedule, loss, seed,
                                   overrides, "distill"))
    return out


def models_to_prune(name: str, part: StudyPart, val: Mapping[tuple[str, int], float]) -> list[Planned]:
    """The distilled models of the longest schedule that the recipes prune, from the val scores of its finished
    runs ({(loss, seed): score}): the best one, or with `prune_seeds` those seeds' models of the loss best on mean
    val. Empty until the schedule has a finished run."""
    if not val:
        return []
    if part.prune_seeds:
        by_loss: dict[str, list[float]] = {}
        for (loss, _), score in val.items():
            by_loss.setdefault(loss, []).append(score)
        loss = max(by_loss, key=lambda m: (sum(by_loss[m]) / len(by_loss[m]), m))
        wanted = {(loss, s) for s in part.prune_seeds}
    else:
        wanted = {max(val, key=lambda k: (val[k], k))}
    return [p for p in plan_part(name, part) if p.schedule == part.longest and (p.loss, p.seed) in wanted]


def plan_prune(name: str, part: StudyPart, best: Planned) -> list[Planned]:
    """One prune experiment per recipe on `best`, the distilled model chosen on val: its overrides plus the recipe's,
    pipeline up to prune (whose default `prune.model` is the distilled model)."""
    return [Planned(f"study-{name}-{best.schedule}-{PRUNED}_{recipe}-{best.loss}-s{best.seed}", name, best.schedule,
                    best.loss, best.seed, {**best.overrides, **overrides}, "prune", recipe)
            for recipe, overrides in part.prune.items()]


def set_arguments(overrides: Mapping[str, Any]) -> list[str]:
    """`-S key=value` arguments; values in YAML flow style, which is how DVC parses them back."""
    args = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip()
        args += ["-S", f"{key}={text.removesuffix('...').strip()}"]
    return args


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """params.yaml's mapping with dotted-key overrides set (new sections and keys are created, then validated)."""
    out = yaml.safe_load(yaml.safe_dump(dict(params)))  # deep copy of plain YAML data
    for key, value in overrides.items():
        node = out
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return out


# ---------------------------------------------------------------------------------------------------- the math
def plateau_gain(curve: Sequence[float]) -> float | None:
    """Best val score of the last quarter of the epochs minus the best before it (< plateau_gain: plateaued); None
    for a curve too short to have a last quarter worth the name."""
    if len(curve) < 4:
        return None
    q = math.ceil(len(curve) / 4)
    return max(curve[-q:]) - max(curve[:-q])


def plateaued(curve: Sequence[float], bound: float) -> bool | None:
    """The study's plateau verdict: the last quarter gained less than `bound`, and the curve reached `bound` at all
    (flat at zero means nothing was learnt, not a plateau); None for a curve too short to judge."""
    g = plateau_gain(curve)
    return None if g is None else bool(g < bound and max(curve) >= bound)


@dataclass(frozen=True)
class Scored:
    """One trained model of the study: its seed and its scores per split."""

    seed: int
    scores: dict[str, float]  # split -> the part's metric
    seconds_per_epoch: float = math.nan


@dataclass(frozen=True)
class MethodRow:
    method: str
    seeds: list[int]
    scores: dict[str, tuple[float, float]]  # split -> (mean, std) over seeds
    gain_vs_plain: dict[str, tuple[float, float]]  # split -> paired (mean, std)
    gain_vs_reference: dict[str, tuple[float, float]] | None
    reference_seeds: int  # seeds paired with the reference (a std needs two)
    time_ratio: tuple[float, float] | None  # seconds per epoch over the same seed's plain student's


def method_rows(runs: Mapping[str, Mapping[int, Scored]]) -> list[MethodRow]:
    """Rows per method (PLAIN first) from {method: {seed: Scored}}, gains paired over the seeds both have."""
    plain, ref = runs.get(PLAIN, {}), runs.get(REFERENCE, {})

    def paired(a: Mapping[int, Scored], b: Mapping[int, Scored]) -> dict[str, tuple[float, float]]:
        seeds = [s for s in sorted(a) if s in b]
        return {split: mean_std([a[s].scores[split] - b[s].scores[split] for s in seeds])
                for split in SPLITS if seeds and all(split in a[s].scores and split in b[s].scores for s in seeds)}

    rows = []
    for method in sorted(runs, key=lambda m: (m != PLAIN, m != REFERENCE, m)):
        by_seed = runs[method]
        seeds = sorted(by_seed)
        scores = {split: mean_std([by_seed[s].scores[split] for s in seeds])
                  for split in SPLITS if all(split in by_seed[s].scores for s in seeds)}
        timed = [by_seed[s].seconds_per_epoch / plain[s].seconds_per_epoch for s in seeds if s in plain]
        rows.append(MethodRow(
            method, seeds, scores,
            gain_vs_plain=paired(by_seed, plain) if method != PLAIN else {},
            gain_vs_reference=paired(by_seed, ref) if method not in (PLAIN, REFERENCE) and ref else None,
            reference_seeds=len(set(by_seed) & set(ref)),
            time_ratio=mean_std(timed) if timed and method != PLAIN else None,
        ))
    return rows


def verdict(row: MethodRow, split: str, min_gain: float) -> str:
    """Whether `row` meets the study's distillation targets on `split`: paired gain >= min_gain over plain, and
    a lead over the reference larger than one std of that lead."""
    g = row.gain_vs_plain.get(split)
    r = (row.gain_vs_reference or {}).get(split)
    if g is None:
        return "no paired plain student"
    if r is None:
        ref = "vs sl2: no paired sl2 run"
    elif row.reference_seeds < 2:
        ref = f"vs sl2 {r[0] * 100:+.2f} (one paired seed: no std to beat)"
    else:
        ref = (f"vs sl2 {r[0] * 100:+.2f} ± {r[1] * 100:.2f} "
               f"({'more' if r[0] > max(r[1], 0) else 'not more'} than one std)")
    met = "met" if g[0] >= min_gain else "missed"
    return f"gain {g[0] * 100:+.2f} points ({met} the {min_gain * 100:+.1f} target); {ref}"
