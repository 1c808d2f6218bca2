"""The summary report: a markdown table built only from the pipeline's metrics and plots files (its two plots are
`yolo_compress.ship.report_plots`).

`build_summary` and the plot functions are deterministic functions of what
`yolo_compress.ship.report_inputs.load_inputs` read (no timestamps, fixed order), so unchanged metrics give
byte-identical markdown.

A row the benchmark flagged (its speedup's spread over the rounds was above `benchmark.max_spread`, after one retry)
is greyed out: its latencies are in italics, never bold, grey in the Pareto plot, and never recommended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from yolo_compress.config import FILE_RUNTIMES, MODEL_NAMES, PRUNE_CONTROL
from yolo_compress.ship.report_inputs import (
    Inputs,
    bench_value,
    eval_interval,
    eval_value,
    file_runtime,
    file_speedup,
    file_value,
    is_flagged,
    model_order,
    scored_splits,
    shipped_rows,
)

__all__ = ["build_summary", "recommend", "prune_ratio"]


# ------------------------------------------------------------------------------------------------------ numbers


def prune_ratio(prune: Mapping[str, Any] | None) -> float | None:
    """Fraction of GFLOPs the prune stage removed from its input (`ratio.gflops_removed`), or None."""
    value = (prune or {}).get("ratio", {}).get("gflops_removed")
    return float(value) if isinstance(value, (int, float)) else None


def _fmt(v: float | None, digits: int, suffix: str = "") -> str:
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def _cell(text: Any) -> str:
    """Markdown-safe table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


@dataclass(frozen=True)
class _Column:
    title: str
    value: Callable[[str], float | None]  # model name -> number (None: not available)
    digits: int
    better: str = ""  # "high" / "low": the best value is bold; "" leaves the column unmarked
    suffix: str = ""
    timing: bool = False  # a latency or speedup: greyed out (italics, never bold) on a flagged row
    spread: Callable[[str], tuple[float, float] | None] | None = None  # model -> 95% interval, shown as ± half of it



def _baseline(inp: Inputs) -> str | None:
    for groups in inp.benchmark.values():
        for key in groups.get("torch", {}):
            if key.startswith("speedup_vs_"):
                return key[len("speedup_vs_"):]
    return None


def _columns(inp: Inputs) -> list[_Column]:
    cols: list[_Column] = []
    for split in scored_splits(inp):
        cols.append(_Column(f"{split} mAP50", lambda n, s=split: eval_value(inp, n, s, "map50"), 3, "high"))
        cols.append(_Column(f"{split} mAP50-95", lambda n, s=split: eval_value(inp, n, s, "map50_95"), 3, "high",
                            spread=lambda n, s=split: eval_interval(inp, n, s, "map50_95")))
    if inp.train_epochs:
        cols.append(_Column("train epochs", lambda n: inp.train_epochs.get(n), 0))
    if any(eval_value(inp, n, "test", "map50_95_lost") is not None for n in inp.evaluate):
        cols.append(_Column("test mAP50-95 lost vs .pt", lambda n: eval_value(inp, n, "test", "map50_95_lost"), 3))
    if inp.benchmark:
        cols += [
            _Column("GFLOPs", lambda n: bench_value(inp, n, "model", "gflops"), 2, "low"),
            _Column("params (M)", lambda n: bench_value(inp, n, "model", "params_m"), 2, "low"),
            _Column("size MB", lambda n: bench_value(inp, n, "model", "size_mb"), 2, "low"),
            _Column("torch p50 ms", lambda n: bench_value(inp, n, "torch", "latency_ms_p50"), 1, "low", timing=True),
            _Column("file p50 ms", lambda n: file_value(inp, n, "latency_ms_p50"), 1, "low", timing=True),
        ]
        if any("gpu" in g for g in inp.benchmark.values()):
            cols.append(_Column("GPU p50 ms", lambda n: bench_value(inp, n, "gpu", "latency_ms_p50"), 2, "low",
                                timing=True))
        base = _baseline(inp)
        if base:
            key = f"speedup_vs_{base}"
            cols.append(_Column(f"torch speedup vs {base}", lambda n: bench_value(inp, n, "torch", key), 2, "high", "×",
                                timing=True))
            cols.append(_Column(f"file speedup vs {base} FP32, same runtime",
                                lambda n: (file_speedup(inp, n) or (None, None))[1], 2, "high", "×", timing=True))
            cols.append(_Column("file speedup spread", lambda n: file_value(inp, n, "speedup_spread"), 2,
                                timing=True))
    ratio = prune_ratio(inp.prune)
    cols.append(_Column("prune ratio", lambda n: ratio * 100 if n == "pruned" and ratio is not None else None, 1,
                        suffix="%"))
    return cols


def _notes(inp: Inputs, name: str) -> list[str]:
    notes = [str(p) for p in inp.notes.get("problems", {}).get(name, [])]
    notes += [f"export: {p}" for p in inp.export_notes.get("problems", {}).get(name, [])]
    if is_flagged(inp, name):
        notes.append("timing too noisy (spread over benchmark.max_spread after a retry): greyed out")
    if name == PRUNE_CONTROL:
        notes.append("epoch-matched control: the pruned model's input fine-tuned as long, unpruned (its architecture "
                     "and speed are the input's)")
    elif inp.benchmark and name not in inp.benchmark:
        notes.append("not benchmarked")
    if name not in inp.evaluate:
        notes.append("not evaluated")
    gap = (inp.student or {}).get("teacher_gap")
    if name == "teacher" and isinstance(gap, Mapping) and not gap.get("teacher_clearly_better", 1):
        notes.append(f"teacher not clearly better than the student (val mAP50-95 gap {gap.get('map50_95', 0):+.3f}, "
                     "metrics/student.json)")
    if name == "pruned" and inp.prune is not None and prune_ratio(inp.prune) is None:
        notes.append("prune.json has no ratio.gflops_removed")
    return notes


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _model_table(inp: Inputs) -> list[str]:
    models = model_order(set(inp.evaluate) | set(inp.benchmark) | set(inp.export_notes.get("problems", {})))
    cols = _columns(inp)
    shown = {c.title: {m: (None if c.value(m) is None else round(c.value(m), c.digits)) for m in models} for c in cols}
    grey = {m for m in models if is_flagged(inp, m)}
    best: dict[str, float | None] = {}
    for c in cols:  # compare what is shown: two values that print the same are both best or neither
        vals = [v for m, v in shown[c.title].items() if v is not None and not (c.timing and m in grey)]
        # all equal (or one value): nothing stands out, so nothing is bold
        best[c.title] = (max(vals) if c.better == "high" else min(vals)) if c.better and len(set(vals)) >= 2 else None
    rows = []
    for m in models:
        row = [m]
        for c in cols:
            v = shown[c.title][m]
            text = _fmt(v, c.digits, c.suffix)
            if v is not None and c.timing and m in grey:
                row.append(f"*{text}*")
            else:
                row.append(f"**{text}**" if v is not None and v == best[c.title] else text)
            ci = c.spread(m) if c.spread and v is not None else None
            if ci:
                row[-1] += f" ± {(ci[1] - ci[0]) / 2:.3f}"
        row.append(_cell("; ".join(_notes(inp, m))))
        rows.append(row)
    return _table(["model", *(c.title for c in cols), "notes"], rows)


def _noise(ci: tuple[float, float] | None) -> str:
    """" [low, high], outside the noise" (the interval excludes 0) or "..., within the noise"; "" without one."""
    if ci is None:
        return ""
    return f" [{ci[0]:+.3f}, {ci[1]:+.3f}], " + ("outside" if ci[0] > 0 or ci[1] < 0 else "within") + " the noise"


def _paired(inp: Inputs, name: str, base: str, key: str) -> list[tuple[str, float, str]]:
    """Per split: (split, name's score minus base's, the text of that difference with its paired interval)."""
    out = []
    for s in scored_splits(inp):
        a, b = eval_value(inp, name, s, key), eval_value(inp, base, s, key)
        if a is None or b is None:
            continue
        out.append((s, a - b, f"{s} {a - b:+.3f}{_noise(eval_interval(inp, name, s, f'{key}_minus_{base}'))}"))
    return out


_INTERVAL = "; [95% paired bootstrap interval over the split's images]"


def _join(texts: Iterable[str]) -> str:
    texts = list(texts)
    return ("; " if any("[" in t for t in texts) else ", ").join(texts)


def _prune_stage_line(inp: Inputs) -> list[str]:
    kept = (inp.prune or {}).get("pruned", {})
    if "drop_ci95_low" not in kept:
        return []
    line = (f"**Prune stage**: kept round {kept['best_round']} of the {kept['rounds_done']} run; its val mAP50-95 drop "
            f"from the input {kept['drop']:+.3f} [{kept['drop_ci95_low']:+.3f}, {kept['drop_ci95_high']:+.3f}].")
    if kept.get("stopped_early"):
        line += " Stopped before all rounds: a later round's drop was over `prune.max_map_drop` with confidence."
    if kept.get("over_bound"):
        line += " **The kept round is over the bound too: no round was within it.**"
    elif kept.get("point_over_bound"):
        line += " Its point drop is over `prune.max_map_drop`, within the noise of the val images."
    return [line]


def _pruning_lines(inp: Inputs) -> list[str]:
    """Pruned against its epoch-matched control (what pruning cost), else against its input, flagged unchecked."""
    extra = (inp.prune or {}).get("pruned", {}).get("finetune_epochs")
    more = f"{extra:.0f} more epochs" if isinstance(extra, (int, float)) else "more epochs"
    control = _paired(inp, "pruned", PRUNE_CONTROL, "map50_95")
    vs_input = _paired(inp, "pruned", "distilled", "map50_95")
    if control:
        lost = [s for s, gain, text in control if gain < 0 and "outside" in text]
        verdict = (f" Pruning **lost accuracy against the control** on {', '.join(lost)}, outside the noise."
                   if lost else " No loss against the control outside the noise.")
        line = (f"**Pruning against its epoch-matched control** (pruned − prune_control, mAP50-95; the control is the "
                f"pruned model's input fine-tuned the same {more} with the same learning rate, data and seed, "
                f"unpruned{_INTERVAL if '[' in control[0][2] else ''}): " + _join(t for _, _, t in control) + "."
                + verdict)
        return [line] + ([f"Pruned − distilled (its input, {more} of training behind it): "
                          + _join(t for _, _, t in vs_input)
                          + "; the control above says how much of that the extra epochs explain."] if vs_input else [])
    if not vs_input:
        return []
    unchecked = (f" **Unchecked**: the pruned model trained {more} than the distilled one (its rounds' "
                 "fine-tunes, `train epochs` column) and no epoch-matched control trained the distilled model "
                 "that long without pruning, so this gain may be that extra training, not pruning."
                 if any(g > 0 for _, g, _ in vs_input) else "")
    return [f"**Pruning** (pruned − distilled, mAP50-95{_INTERVAL if '[' in vs_input[0][2] else ''}): "
            + _join(t for _, _, t in vs_input) + "." + unchecked]


def _distill_lines(inp: Inputs) -> list[str]:
    lines = []
    pose = any(eval_value(inp, "distilled", s, "pose_map50_95") is not None for s in scored_splits(inp))
    key, name = ("pose_map50_95", "OKS keypoint AP") if pose else ("map50_95", "mAP50-95")
    gains = _paired(inp, "distilled", "student", key)
    if gains:
        lost = [s for s, g, _ in gains if g <= 0]
        verdict = (" **No gain: the distilled model is not better than the plain student on any split; ship the "
                   "student.**" if len(lost) == len(gains) else
                   f" Not better than the plain student on {', '.join(lost)}." if lost else "")
        seeds = (f" Seed to seed, the plain student's val mAP50-95 moves by {inp.seed_std[0]:.3f} (std over "
                 f"{inp.seed_std[1]} seeds): a gain within that may not survive another seed." if inp.seed_std else "")
        lines.append(f"**Distillation** (distilled − student, {name}{_INTERVAL if '[' in gains[0][2] else ''}): "
                     + _join(t for _, _, t in gains) + "." + verdict + seeds)
    else:
        lines.append("**Distillation**: needs both the student and the distilled model in the evaluate metrics.")
    lines += _prune_stage_line(inp)
    lines += _pruning_lines(inp)
    gap = (inp.student or {}).get("teacher_gap")
    if isinstance(gap, Mapping) and "map50_95" in gap:
        verdict = "clearly better" if gap.get("teacher_clearly_better", 1) else "NOT clearly better"
        lines.append(f"Teacher − student at training time (val mAP50-95): {gap['map50_95']:+.3f}, "
                     f"teacher {verdict}.")
    return lines


def _num_text(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _cell(v)
    return str(v) if isinstance(v, int) else f"{v:.4g}"


def _rounds_table(rounds: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rounds:
        keys += [k for k in r if k not in keys]
    return _table(keys, [[_num_text(r.get(k, "–")) for k in keys] for r in rounds])


def _machine_line(inp: Inputs) -> str | None:
    info = inp.notes.get("machine", {})
    parts = [info.get("cpu_model")]
    if "threads" in inp.machine:
        parts.append(f"{int(inp.machine['threads'])} threads")
    if "matmul_peak_gflops" in inp.machine:
        parts.append(f"fp32 matmul peak {inp.machine['matmul_peak_gflops']:.1f} GFLOP/s")
    parts += [f"{k} {info[k]}" for k in ("torch", "onnxruntime", "openvino") if k in info]
    if info.get("openvino_precision", "f32") != "f32":  # the CPU's default: OpenVINO files are not computed in FP32
        parts.append(f"OpenVINO computing in {info['openvino_precision']} (its default on this CPU, FP32 IRs too)")
    parts = [p for p in parts if p]
    return ("Timings on " + ", ".join(parts) + ". Latencies compare only within one benchmark run.") if parts else None


def _int8_lines(inp: Inputs) -> list[str]:
    """Per model and runtime with both files: INT8 against its own FP32 (p50 ratio, test accuracy); whether the CPU
    has VNNI."""
    lines = []
    for model in MODEL_NAMES:
        for rt, prefix in (("onnx", ""), ("openvino", "openvino_")):
            fp32, int8 = f"{model}_{prefix}fp32", f"{model}_{prefix}int8"
            p32, p8 = bench_value(inp, fp32, rt, "latency_ms_p50"), bench_value(inp, int8, rt, "latency_ms_p50")
            if p32 is None or p8 is None:
                continue
            split = "test" if "test" in scored_splits(inp) else "val"
            a32, a8 = eval_value(inp, fp32, split, "map50_95"), eval_value(inp, int8, split, "map50_95")
            noise = _noise(eval_interval(inp, int8, split, "map50_95_minus_fp32"))
            acc = (f", {split} mAP50-95 {a8 - a32:+.3f}{noise} ({a32:.3f} → {a8:.3f})"
                   if a32 is not None and a8 is not None else "")
            lines.append(f"INT8 vs FP32 of {model} in {FILE_RUNTIMES[rt]}: {p32 / p8:.2f}× faster (p50 {p32:.1f} → "
                         f"{p8:.1f} ms){acc}.")
    vnni = inp.machine.get("int8_vnni")
    if lines and vnni is not None:
        lines.append("This CPU has VNNI (int8 dot products), which the INT8 kernels use." if vnni else
                     "This CPU lacks VNNI (AVX512-VNNI / AVX-VNNI): INT8 kernels fall back to slower int8 "
                     "arithmetic, so INT8 may not beat FP32 here.")
    return lines


def recommend(inp: Inputs, max_map_drop: float) -> tuple[str | None, str]:
    """(the recommended shipped file's row name or None, one markdown line saying which and why).

    The fastest shipped file (p50 in its runtime, all timed in one interleaved run) whose test mAP50-95 (val when the
    data has no test split) is at most `max_map_drop` below the better of the distilled PyTorch model and its
    epoch-matched control (prune_control, where scored): pruning must not lose against the model trained as long,
    nor against the one it started from. Rows with flagged timings are not candidates.
    """
    split = "test" if "test" in scored_splits(inp) else "val"
    refs = {n: eval_value(inp, n, split, "map50_95") for n in ("distilled", PRUNE_CONTROL)}
    ref_name = max((n for n in refs if refs[n] is not None), key=lambda n: refs[n], default="distilled")
    ref = refs[ref_name]
    if ref is None:
        return None, f"**Recommended file**: none; needs the distilled model's {split} mAP50-95 (evaluate metrics)."
    shipped = [n for n in shipped_rows(inp) if eval_value(inp, n, split, "map50_95") is not None]
    if not shipped:
        return None, f"**Recommended file**: none; no shipped file has both a latency and a {split} score."
    noisy = [n for n in shipped if is_flagged(inp, n)]
    low = [n for n in shipped if n not in noisy and eval_value(inp, n, split, "map50_95") < ref - max_map_drop - 1e-12]
    ok = [n for n in shipped if n not in noisy and n not in low]
    why = []
    if low:
        why.append("below the bound: " + ", ".join(f"{n} ({eval_value(inp, n, split, 'map50_95'):.3f})" for n in low))
    if noisy:
        why.append("timing flagged: " + ", ".join(noisy))
    excluded = f" Excluded: {'; '.join(why)}." if why else ""
    what = ("the epoch-matched control (`prune_control`, the pruned model's input trained as long)"
            if ref_name == PRUNE_CONTROL else "the distilled PyTorch model" + (
                ", better than its epoch-matched control" if refs[PRUNE_CONTROL] is not None else ""))
    bound = f"within `report.max_map_drop` = {max_map_drop} of {what} ({split} {ref:.3f})"
    if not ok:
        hint = (f" The unpruned `{ref_name}` is then the model to ship: list it in `export.models` to get its files."
                if refs[PRUNE_CONTROL] is not None else "")
        return None, f"**Recommended file**: none; no shipped file is {bound}.{excluded}{hint}"
    best = min(ok, key=lambda n: (file_value(inp, n, "latency_ms_p50"), n))
    lat, acc = file_value(inp, best, "latency_ms_p50"), eval_value(inp, best, split, "map50_95")
    up = file_speedup(inp, best)
    runtime = FILE_RUNTIMES[file_runtime(inp, best) or "onnx"]
    speed = f", {up[1]:.2f}× vs {up[0]} in the same runtime" if up else ""
    return best, (f"**Recommended file**: `{best}` ({runtime}), the fastest shipped file (p50 {lat:.1f} ms{speed}) "
                  f"whose {split} mAP50-95 ({acc:.3f}, {acc - ref:+.3f}) is {bound}.{excluded}")


def build_summary(inp: Inputs, max_map_drop: float = 0.015) -> str:
    """The whole summary.md: header naming the sources, model table (best per column in bold), the recommended
    shipped file (`recommend`), notes, rounds."""
    out = ["# Compression summary", "",
           "Generated by `stages/report.py` (`dvc repro report`) from "
           + ", ".join(f"`{s}`" for s in inp.sources) + "; do not edit by hand.", ""]
    out += _model_table(inp)
    out += ["", "Bold: best value in its column (higher mAP and speedup, lower size, FLOPs and latency). Rows "
            "`<model>_<format>` are the shipped files (ONNX Runtime, or OpenVINO for `openvino_*`), timed in their "
            "runtime; italics: timing flagged as too noisy. ± is half the 95% "
            "bootstrap interval over the split's images: a difference between rows smaller than that may be noise, "
            "and the paired intervals below say which are not."]
    if shipped_rows(inp):
        out += ["", recommend(inp, max_map_drop)[1]]
        int8 = _int8_lines(inp)
        if int8:
            out += ["", " ".join(int8)]
    line = _machine_line(inp)
    if line:
        out += ["", line]
    for line in _distill_lines(inp):
        out += ["", line]
    if inp.prune_rounds:
        out += ["", "## Prune rounds", "", *_rounds_table(inp.prune_rounds)]
    if inp.missing:
        out += ["", "## Missing inputs", "", *(f"- {_cell(m)}" for m in inp.missing)]
    return "\n".join(out) + "\n"
