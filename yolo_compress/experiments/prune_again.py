"""The prune stage's input pruned again under other params, outside the pipeline: the step that
experiments/activation_runtimes.py and experiments/decision_stability.py share."""

from __future__ import annotations

from pathlib import Path

from yolo_compress.config import DistillConfig, Params
from yolo_compress.prune.run import kept_round, prune_rounds, rounds_setup


def prune_again(params: Params, data: Path, input_pt: Path, task: str, rounds_dir: Path, work: Path,
                distill: DistillConfig | None = None) -> tuple[list[dict[str, float]], int, list[str]]:
    """Every round of `input_pt` under `params` (checkpoints in `rounds_dir`, training runs under `work`): the rounds'
    rows, the kept round and its warnings, as the prune stage decides them (`kept_round`)."""
    setup = rounds_setup(params, data, work, task, distill)
    rows = [row for row, _ in prune_rounds(input_pt, rounds_dir, setup)]
    keep, warnings = kept_round(rows, params.prune)
    return rows, keep, warnings
