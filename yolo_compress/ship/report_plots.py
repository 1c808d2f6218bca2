"""The report's two plots: test mAP50-95 against latency (with the Pareto front), and mAP against GFLOPs over the
prune rounds. Deterministic functions of what `yolo_compress.ship.report_inputs.load_inputs` read."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yolo_compress.ship.report_inputs import (
    Inputs,
    bench_value,
    eval_value,
    file_value,
    is_flagged,
    model_order,
    scored_splits,
    shipped_rows,
)

__all__ = ["pareto_front", "plot_pareto", "plot_prune_curve"]


def pareto_front(points: Mapping[str, tuple[float, float]]) -> list[str]:
    """Names on the front of (latency, mAP) points: no other point is at least as fast and strictly more accurate,
    or strictly faster and at least as accurate. Ordered by latency."""
    front = []
    for n, (lat, acc) in points.items():
        dominated = any((ol <= lat and oa > acc) or (ol < lat and oa >= acc)
                        for o, (ol, oa) in points.items() if o != n)
        if not dominated:
            front.append(n)
    return sorted(front, key=lambda n: (points[n][0], n))


def _pareto_points(inp: Inputs) -> tuple[dict[str, tuple[float, float]], str, str]:
    """The shipped files (one point per model x format, latency in its runtime) when there are any, else the PyTorch
    rows."""
    splits = scored_splits(inp)
    split = "test" if "test" in splits else (splits[0] if splits else "val")
    shipped = [m for m in shipped_rows(inp) if eval_value(inp, m, split, "map50_95") is not None]
    models = shipped or [m for m in model_order(inp.benchmark) if eval_value(inp, m, split, "map50_95") is not None]
    runtime = "file" if shipped else "torch"
    pts = {m: (file_value(inp, m, "latency_ms_p50") if shipped else bench_value(inp, m, "torch", "latency_ms_p50"),
               eval_value(inp, m, split, "map50_95")) for m in models}
    return {m: p for m, p in pts.items() if p[0] is not None}, runtime, split  # type: ignore[misc]


def _save(fig: Any, path: str | Path) -> None:
    from yolo_compress.files import write_with

    # no Software/date metadata: the same numbers give the same bytes
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None}))


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")  # no display; DejaVu Sans ships with matplotlib, so nothing is downloaded
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.4))


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _placeholder(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_pareto(inp: Inputs, path: str | Path) -> None:
    """Test mAP50-95 vs batch-1 latency p50 of the shipped files (each in its runtime; PyTorch rows when nothing was
    exported), labelled, with the Pareto front of the rows whose timing is trusted (flagged rows are grey)."""
    pts, runtime, split = _pareto_points(inp)
    fig, ax = _figure()
    if not pts:
        _placeholder(ax, "no model has both evaluate and benchmark metrics")
    else:
        for name, (lat, acc) in pts.items():
            grey = is_flagged(inp, name)
            ax.scatter([lat], [acc], s=40, **({"color": "lightgrey"} if grey else {}))
            ax.annotate(name + (" (noisy)" if grey else ""), (lat, acc), textcoords="offset points", xytext=(5, 5),
                        color="grey" if grey else "black")
        front = pareto_front({n: p for n, p in pts.items() if not is_flagged(inp, n)} or pts)
        ax.step([pts[n][0] for n in front], [pts[n][1] for n in front], where="post", color="grey", ls="--",
                label="Pareto front")
        ax.set_xlabel(f"{'ONNX Runtime / OpenVINO' if runtime == 'file' else 'PyTorch'} latency p50, batch 1 (ms)")
        ax.set_ylabel(f"{split} mAP50-95")
        ax.set_title("Accuracy vs latency")
        ax.margins(0.15)  # room for the labels of the corner points
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    _close(fig)


def plot_prune_curve(inp: Inputs, path: str | Path) -> None:
    """Val mAP50-95 vs GFLOPs over the prune rounds (plots/prune.json); a placeholder when there are none."""
    ykey = "map50_95_after"
    rounds = [r for r in inp.prune_rounds or [] if isinstance(r.get("gflops"), (int, float))
              and isinstance(r.get(ykey), (int, float))]
    fig, ax = _figure()
    if not rounds:
        _placeholder(ax, "no prune rounds (plots/prune.json missing or without gflops and mAP)")
    else:
        xs, ys = [r["gflops"] for r in rounds], [r[ykey] for r in rounds]
        ax.plot(xs, ys, marker="o")
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            ax.annotate(str(rounds[i].get("round", i)), (x, y), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("GFLOPs (one image)")
        ax.set_ylabel(f"val {ykey.replace('_', ' ')}")
        ax.set_title("Prune rounds: accuracy vs compute")
        ax.invert_xaxis()  # rounds go left to right as the model shrinks
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    _close(fig)
