"""The study's records: one JSON per finished experiment under reports/study_records/, committed the moment it ends.

Git refs of DVC experiments and the DVC cache do not outlive a session's machine; commits do. A record holds what the
report needs (params, the code it ran, per-epoch val curves, pycocotools scores per split), so a grid of any size
completes over as many sessions as it takes: a rerun skips each experiment whose record has the same params and the
same stage code (the md5 of every code dependency of the stages it ran, as dvc.lock hashes them, and their commands).
Reading, comparing, estimating and the budget live here; writing a record from an experiment's outputs in
yolo_compress.experiments.study_experiment; running and committing in yolo_compress.experiments.study.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from yolo_compress.errors import UserError
from yolo_compress.experiments.study_plan import Planned

log = logging.getLogger("yolo_compress.experiments.study")
RECORDS = Path("reports/study_records")
# What the pipeline did before params.yaml had the key: experiments made then match a recipe that sets it so.
PARAMS_BEFORE_THE_KEY = {"prune.activation": "keep", "distill.kpt_weight": 1.0}
# A first guess of an experiment's length before the part has a record: seconds per training image and epoch of a
# yolo11n at 256 px on 2 CPU cores (measured: 17 s per epoch of 400 images; 8 s of 300 at 192 px), scaled by area.
SECONDS_PER_IMAGE_EPOCH = 0.045
DVC_CACHE = Path(".dvc/cache/files/md5")  # where DVC 3 keeps a file of md5 m: m[:2]/m[2:]


def record_path(name: str, root: Path = RECORDS) -> Path:
    return root / f"{name}.json"


def load_records(root: Path = RECORDS) -> dict[str, dict[str, Any]]:
    """Experiment name -> record; an unreadable file is skipped with a warning (its experiment runs again)."""
    records = {}
    for path in sorted(root.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            records[str(record["name"])] = record
        except (ValueError, KeyError, TypeError) as err:
            log.warning("%s: not a study record (%s); its experiment runs again", path, err)
    return records


def keys_that_differ(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[str]:
    """`overrides`' dotted keys whose value in `params` differs, as "key old -> new"; a key added to params.yaml
    after an experiment ran reads as the behaviour it had then (`PARAMS_BEFORE_THE_KEY`)."""
    differ = []
    for key, value in overrides.items():
        node: Any = params
        for k in key.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            node = PARAMS_BEFORE_THE_KEY.get(key)
        if node != value:
            differ.append(f"{key} {node!r} -> {value!r}")
    return differ


def code_that_differs(recorded: Mapping[str, str], current: Mapping[str, str | None]) -> list[str]:
    """The code dependencies, stage commands and start files whose hash changed, appeared or went since the
    record; a start file missing here (hash None) cannot be checked and is taken as recorded."""
    unknown = {k for k, v in current.items() if v is None}
    return sorted(k for k in (set(recorded) | set(current)) - unknown if recorded.get(k) != current.get(k))


def why_stale(record: Mapping[str, Any], p: Planned, code: Mapping[str, str | None]) -> str | None:
    """None when `record` is `p`'s result under today's params and stage code; otherwise one line saying why not."""
    params = keys_that_differ(record.get("params") or {}, p.overrides)
    if params:
        return f"its params differ ({'; '.join(params[:3])})"
    changed = code_that_differs(record.get("code") or {}, code)
    if changed:
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"its stage code or start files changed ({', '.join(changed[:3])}{more})"
    return None


def planned_epochs(overrides: Mapping[str, Any], params: Mapping[str, Any], target: str) -> int:
    """Training epochs an experiment runs from scratch: teacher, plain student, distilled student (and when `target`
    is prune, the rounds' fine-tunes twice: the prune stage trains its epoch-matched control as long)."""

    def get(key: str) -> Any:
        if key in overrides:
            return overrides[key]
        section, name = key.split(".")
        return (params.get(section) or {}).get(name)

    epochs = int(get("teacher.epochs") or 0) + 2 * int(get("student.epochs") or 0)
    if target == "prune":
        rounds, each = int(get("prune.rounds") or 0), int(get("prune.finetune_epochs") or 0)
        last = get("prune.last_round_epochs")
        epochs += 2 * (max(rounds - 1, 0) * each + int(each if last is None else last)) if rounds else 0
    return epochs


def in_dvc_cache(md5: str, dvc_cache: Path = DVC_CACHE) -> bool:
    """Whether DVC's cache still holds the file of this md5 (a new machine's does not)."""
    return len(md5) > 2 and (dvc_cache / md5[:2] / md5[2:]).is_file()


def estimate_seconds(p: Planned, records: Sequence[Mapping[str, Any]], params: Mapping[str, Any],
                     dvc_cache: Path = DVC_CACHE) -> float:
    """How long `p` may take, from the finished experiments of the same part, kind and schedule, else
    `planned_epochs` at SECONDS_PER_IMAGE_EPOCH. The first of a part also trained the shared teacher, and the first of
    a seed its plain student; later ones take both from DVC's run cache. So while the teachers are still in the DVC
    cache, a distill experiment is estimated as the fastest like it, plus its plain student's epochs when its seed has
    no record yet (10% margin); otherwise, and for prune experiments, as the slowest like it."""
    like = [r for r in records if r.get("part") == p.part and r.get("target") == p.target
            and r.get("schedule") == p.schedule and "seconds" in r]
    if like:
        slowest = max(float(r["seconds"]) for r in like)
        cached = all(in_dvc_cache(str(r.get("teacher_md5", "")), dvc_cache) for r in like)
        if p.target != "distill" or not cached:
            return slowest
        fastest = min(like, key=lambda r: float(r["seconds"]))
        plain = 0.0
        if not any(r.get("seed") == p.seed for r in like):
            per_epoch = (fastest.get("seconds_per_epoch") or {}).get("student")
            if per_epoch is None:  # a record from before seconds_per_epoch
                return slowest
            plain = float(p.overrides.get("student.epochs", 0)) * float(per_epoch)
        return min(slowest, 1.1 * (float(fastest["seconds"]) + plain))
    data = {**(params.get("data") or {}), **{k.split(".", 1)[1]: v for k, v in p.overrides.items()
                                            if k.startswith("data.")}}
    imgsz = int(p.overrides.get("student.imgsz", (params.get("student") or {}).get("imgsz", 256)))
    images = int(data.get("train_images", 400))
    return planned_epochs(p.overrides, params, p.target) * images * SECONDS_PER_IMAGE_EPOCH * (imgsz / 256) ** 2


class Budget:
    """--budget: experiments start only while their estimated length fits in what is left."""

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.monotonic() + minutes * 60
        self.minutes, self.started, self.spent = minutes, 0, False

    def allows(self, p: Planned, seconds: float) -> bool:
        """Whether `p` (about `seconds` long) may start; UserError when not even the first one fits."""
        if self.end is None:
            return True
        left = self.end - time.monotonic()
        if seconds <= left:
            return True
        if self.started == 0 and not self.spent:
            raise UserError(f"--budget {self.minutes:g} min is too small for one experiment: {p.name} needs about "
                            f"{seconds / 60:.0f} min (from the records of part {p.part}, or its epochs); raise "
                            "--budget")
        log.info("budget: stopping before %s (about %.0f min; %.0f min left); rerun to go on", p.name, seconds / 60,
                 max(left, 0) / 60)
        self.spent = True
        return False
