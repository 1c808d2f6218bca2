"""What the report reads: the pipeline's metrics and plots files, loaded into `Inputs`, and the values in them.

`load_inputs` reads the files (whatever exists: a removed stage leaves a note, not an error); the summary table and
plots (yolo_compress.ship.report) are deterministic functions of what was read.
`missing_report_keys` lists the keys they read that committed metrics lack (the freshness check).

Inputs (paths relative to the metrics folder unless given):
  evaluate/<model>.json   {<split>: {map50_95, map50, ..., map50_95_ci95_low/high, map50_95_minus_<base>...}}  required
  evaluate/<model>_<fmt>.json  the same for a shipped file (export stage), plus `<split>.map50_95_lost`
  benchmark/<model>.json  {model: {gflops, params_m, size_mb}, torch: {...}, gpu: {...}}; PyTorch rows
  benchmark/<model>_<fmt>.json  {model: {...}, onnx: {latency_ms_p50, speedup_vs_<baseline>_fp32, flagged, ...}}
  benchmark/machine.json  {threads, matmul_peak_gflops, load_1m_before, int8_vnni, ...}
  prune.json              the prune ratio: `ratio.gflops_removed`
  student.json            `teacher_gap` {map50_95, teacher_clearly_better}
  plots/prune.json        per-round records, e.g. {round, gflops, map50_95_after}
  reports/benchmark_notes.json  the benchmark's strings: machine info, per-row problems, flagged rows
  models/export/notes.json      the export stage's per-model problems
  reports/distill_comparison.md compare_distill's seed grid: the plain student's seed-to-seed std (`seed_grid_std`)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_compress.config import EVAL_SPLITS, EXPORT_FORMATS, FILE_RUNTIMES, MODEL_NAMES, PRUNE_CONTROL
from yolo_compress.errors import UserError
from yolo_compress.files import read_json

__all__ = ["MACHINE_FILE", "Inputs", "load_inputs", "model_order", "bench_value", "is_flagged", "shipped_rows",
           "file_runtime", "file_value", "file_speedup",
           "eval_value", "eval_interval", "scored_splits", "seed_grid_std", "missing_report_keys"]

MACHINE_FILE = "machine.json"


@dataclass
class Inputs:
    """Everything the report reads; `sources` are the files actually read, `missing` one note per absent input."""

    evaluate: dict[str, dict[str, Any]]
    benchmark: dict[str, dict[str, Any]] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    export_notes: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] | None = None
    prune_rounds: list[dict[str, Any]] | None = None
    student: dict[str, Any] | None = None
    train_epochs: dict[str, float] = field(default_factory=dict)  # model -> epochs it trained in all (train stages)
    seed_std: tuple[float, int] | None = None  # the plain student's val mAP50-95 std over seeds, and how many seeds
    sources: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def model_order(names: Iterable[str]) -> list[str]:
    """Pipeline order (teacher, student, distilled, pruned), each followed by its shipped files (`<model>_<fmt>`, in
    EXPORT_FORMATS order), then any other names sorted."""
    names = set(names)
    order = [f for m in MODEL_NAMES for f in (m, *(f"{m}_{fmt}" for fmt in EXPORT_FORMATS))]
    return [n for n in order if n in names] + sorted(names - set(order))


def load_inputs(metrics_dir: str | Path, prune_plots: str | Path | None = None,
                benchmark_notes: str | Path | None = None, export_notes: str | Path | None = None,
                seed_grid: str | Path | None = None) -> Inputs:
    """Read every input that exists; UserError when there is no evaluate metrics folder (nothing to report)."""
    metrics_dir = Path(metrics_dir)
    eval_dir = metrics_dir / "evaluate"
    eval_files = sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []
    if not eval_files:
        raise UserError(f"{eval_dir}: no evaluate metrics (<model>.json); run `dvc repro evaluate` first")
    inp = Inputs(evaluate={p.stem: read_json(p) for p in eval_files}, sources=[f"{eval_dir}/*.json"])

    bench_dir = metrics_dir / "benchmark"
    bench_files = sorted(p for p in bench_dir.glob("*.json") if p.name != MACHINE_FILE) if bench_dir.is_dir() else []
    if bench_files:
        inp.benchmark = {p.stem: read_json(p) for p in bench_files}
        inp.sources.append(f"{bench_dir}/*.json")
        if (bench_dir / MACHINE_FILE).is_file():
            inp.machine = read_json(bench_dir / MACHINE_FILE)
    else:
        inp.missing.append(f"no benchmark metrics ({bench_dir}): sizes, FLOPs and latencies are not shown")

    def optional(path: Path | None, what: str) -> Any:
        if path is None or not path.is_file():
            inp.missing.append(f"no {path or what}: {what} not shown")
            return None
        inp.sources.append(str(path))
        return read_json(path)

    inp.notes = optional(Path(benchmark_notes) if benchmark_notes else None, "benchmark notes") or {}
    if export_notes is not None:
        inp.export_notes = optional(Path(export_notes), "export problems") or {}
    inp.prune = optional(metrics_dir / "prune.json", "prune ratio")
    rounds = optional(Path(prune_plots) if prune_plots else None, "prune rounds")
    inp.prune_rounds = rounds if isinstance(rounds, list) else None
    inp.student = optional(metrics_dir / "student.json", "teacher check")
    inp.train_epochs = _train_epochs(metrics_dir, inp.prune, inp.sources)
    if seed_grid is not None:
        inp.seed_std = seed_grid_std(seed_grid)
        if inp.seed_std is None:
            inp.missing.append(f"no seed grid in {seed_grid}: the seed-to-seed spread is not shown")
        else:
            inp.sources.append(str(seed_grid))
    return inp


def _train_epochs(metrics_dir: Path, prune: Any, sources: list[str]) -> dict[str, float]:
    """Epochs each model trained in all: the train stages' `train.epochs`; the pruned model (and its control) its
    input's training epochs plus its rounds' fine-tunes (metrics/prune.json)."""
    out: dict[str, float] = {}
    for name, file in (("teacher", "teacher.json"), ("student", "student.json"), ("distilled", "distill.json")):
        doc = read_json(metrics_dir / file) if (metrics_dir / file).is_file() else {}
        epochs = (doc.get("train") or {}).get("epochs") if isinstance(doc, Mapping) else None
        if isinstance(epochs, (int, float)):
            out[name] = float(epochs)
            if str(metrics_dir / file) not in sources:
                sources.append(str(metrics_dir / file))
    if isinstance(prune, Mapping):
        start = (prune.get("input") or {}).get("train_epochs")
        for name, group in (("pruned", "pruned"), (PRUNE_CONTROL, "control")):
            extra = (prune.get(group) or {}).get("finetune_epochs")
            if isinstance(extra, (int, float)) and isinstance(start, (int, float)):
                out[name] = float(start + extra)
    return out


# The line `python -m yolo_compress.experiments.compare_distill` writes atop its table (reports/distill_comparison.md).
SEED_LINE = re.compile(r"Plain student \(baseline\), val mAP50-95: [\d.]+ ± ([\d.]+) \(seeds ([\d ]+)\)")


def seed_grid_std(path: str | Path) -> tuple[float, int] | None:
    """(std of the plain student's val mAP50-95 over seeds, number of seeds) from a committed seed grid, or None."""
    path = Path(path)
    found = SEED_LINE.search(path.read_text()) if path.is_file() else None
    if not found or len(found.group(2).split()) < 2:
        return None
    return float(found.group(1)), len(found.group(2).split())


def eval_interval(inp: Inputs, name: str, split: str, key: str) -> tuple[float, float] | None:
    """The 95% bootstrap interval of evaluate/<name>.json's `split.key` (`<key>_ci95_low/high`), or None."""
    low, high = eval_value(inp, name, split, f"{key}_ci95_low"), eval_value(inp, name, split, f"{key}_ci95_high")
    return None if low is None or high is None else (low, high)


# ------------------------------------------------------------------------------------------------------- values


def bench_value(inp: Inputs, name: str, group: str, key: str) -> float | None:
    """benchmark/<name>.json's `group.key` (group: model, torch, onnx, gpu) as a float, or None."""
    v = inp.benchmark.get(name, {}).get(group, {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def is_flagged(inp: Inputs, name: str) -> bool:
    """The benchmark flagged this row's timing as too noisy to trust (spread over benchmark.max_spread)."""
    return any(bench_value(inp, name, rt, "flagged") for rt in ("torch", *FILE_RUNTIMES))


def file_runtime(inp: Inputs, name: str) -> str | None:
    """The runtime group (`onnx`, `openvino`) a shipped file's row was timed in; None for a PyTorch row."""
    if "torch" in inp.benchmark.get(name, {}):
        return None
    return next((rt for rt in FILE_RUNTIMES if bench_value(inp, name, rt, "latency_ms_p50") is not None), None)


def file_value(inp: Inputs, name: str, key: str) -> float | None:
    """A shipped file's timing `key` in its own runtime group; None for a PyTorch row."""
    rt = file_runtime(inp, name)
    return bench_value(inp, name, rt, key) if rt else None


def file_speedup(inp: Inputs, name: str) -> tuple[str, float] | None:
    """(baseline row, speedup) of a shipped file against the baseline's FP32 file in the same runtime, or None."""
    rt = file_runtime(inp, name)
    group = inp.benchmark.get(name, {}).get(rt or "", {})
    return next(((k[len("speedup_vs_"):], float(v)) for k, v in sorted(group.items()) if k.startswith("speedup_vs_")
                 and isinstance(v, (int, float))), None)


def shipped_rows(inp: Inputs) -> list[str]:
    """Rows of shipped files (the export stage's `<model>_<fmt>`), timed in their runtime, in model order."""
    return [n for n in model_order(inp.benchmark) if file_runtime(inp, n)]


def eval_value(inp: Inputs, name: str, split: str, key: str) -> float | None:
    """evaluate/<name>.json's `split.key` as a float, or None."""
    v = inp.evaluate.get(name, {}).get(split, {})
    v = v.get(key) if isinstance(v, Mapping) else None
    return float(v) if isinstance(v, (int, float)) else None


def scored_splits(inp: Inputs) -> list[str]:
    """The splits any evaluate metrics file scores, in EVAL_SPLITS order, then any others sorted."""
    found = {s for m in inp.evaluate.values() for s, v in m.items() if isinstance(v, Mapping)}
    return [s for s in EVAL_SPLITS if s in found] + sorted(found - set(EVAL_SPLITS))


# -------------------------------------------------------------------------------------------- the report's keys

# Keys each metrics file must carry for the report's table and plots; freshness checks committed metrics against them.
REQUIRED_KEYS = {
    "benchmark": (("model", "gflops"), ("model", "params_m"), ("model", "size_mb")),
    "prune.json": (("ratio", "gflops_removed"),),
    "student.json": (("teacher_gap", "map50_95"), ("teacher_gap", "teacher_clearly_better")),
}
EVAL_KEYS = ("map50", "map50_95")  # per split of evaluate/<model>.json


def missing_report_keys(metrics_dir: str | Path) -> list[str]:
    """`file: key` for every key the report reads that a metrics file in `metrics_dir` lacks (or cannot parse)."""
    metrics_dir = Path(metrics_dir)
    missing: list[str] = []

    def lacks(path: Path, keys_of: Callable[[Any], Iterable[tuple[str, ...]]]) -> None:
        try:
            data = read_json(path)
        except UserError as err:
            missing.append(str(err).split(";")[0])
            return
        for key in keys_of(data):
            node: Any = data
            for part in key:
                node = node.get(part) if isinstance(node, Mapping) else None
            if isinstance(node, bool) or not isinstance(node, (int, float)):
                missing.append(f"{path}: {'.'.join(key)}")

    def eval_keys(data: Any) -> list[tuple[str, ...]]:
        splits = [s for s, v in data.items() if isinstance(v, Mapping)] if isinstance(data, Mapping) else []
        return [(s, k) for s in splits for k in EVAL_KEYS] if splits else [("<split>", EVAL_KEYS[1])]

    def bench_keys(data: Any) -> tuple[tuple[str, ...], ...]:
        # a PyTorch row has a torch group, a shipped file its runtime's group (with its flag); one at least
        groups = [rt for rt in ("torch", *FILE_RUNTIMES)
                  if isinstance(data, Mapping) and isinstance(data.get(rt), Mapping)]
        timing = tuple((rt, k) for rt in groups or ["torch"] for k in ("latency_ms_p50", "flagged"))
        return REQUIRED_KEYS["benchmark"] + timing

    evals = sorted((metrics_dir / "evaluate").glob("*.json"))
    if not evals:
        missing.append(f"{metrics_dir / 'evaluate'}/*.json: no file")
    for path in evals:
        lacks(path, eval_keys)
    for path in sorted((metrics_dir / "benchmark").glob("*.json")):
        if path.name != MACHINE_FILE:
            lacks(path, bench_keys)
    for name in ("prune.json", "student.json"):
        if (metrics_dir / name).is_file():
            lacks(metrics_dir / name, lambda _data, n=name: REQUIRED_KEYS[n])
    return missing
