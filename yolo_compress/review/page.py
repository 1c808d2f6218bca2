"""A review page for one change: params, metrics and plots against BASE, from the committed results alone.

    python -m yolo_compress.review                 # BASE: the last results commit; writes reports/review/review.md
    python -m yolo_compress.review main --out review.md

BASE defaults to the last commit that changed dvc.lock (the one before it when the workspace's dvc.lock is that
commit's): a commit that exists after `git clone`, unlike tags. Headline rows come first (test mAP50-95, GFLOPs, ONNX
latency, distillation gain). A change smaller than the measured noise is flagged: latency and time about ±30% on 2
shared cores; mAP within what reseeding alone moves it, from the committed seed grid (`SEED_GRID`). Stages whose
params or code changed since their results were made are listed (yolo_compress.review.freshness), so a reader knows
which numbers may be out of date. Nothing is trained or run: seconds, not minutes.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from yolo_compress import files
from yolo_compress.errors import UserError
from yolo_compress.review.freshness import check, describe_code_changes
from yolo_compress.ship.report_inputs import seed_grid_std

# (file glob, dotted key, label): the rows a reviewer reads first, in this order.
# Shipped files (export stage) have rows of their own, e.g. `metrics/evaluate/pruned_int8.json`.
HEADLINE = (
    ("metrics/evaluate/*.json", "test.map50_95", "test mAP50-95"),
    ("metrics/evaluate/*.json", "test.map50_95_lost", "test mAP50-95 lost by export"),
    ("metrics/benchmark/*.json", "model.gflops", "GFLOPs"),
    ("metrics/benchmark/*.json", "onnx.latency_ms_p50", "ONNX Runtime latency p50 (ms)"),
    ("metrics/benchmark/*.json", "openvino.latency_ms_p50", "OpenVINO latency p50 (ms)"),
    ("metrics/distill.json", "vs_student.map50_95_gain", "distillation gain (mAP50-95)"),
)
# Latency noise: identical yolo11n checkpoints ranged 11.8-14.4 ms ONNX p50 in one quiet benchmark run, about ±30%
# across runs (docs/measured-facts.md).
TIME_NOISE_REL = 0.30
TIME_KEYS = ("latency_ms", "seconds", "throughput")
# mAP noise: the committed seed grid of `python -m yolo_compress.experiments.compare_distill` (the plain student's val
# mAP50-95 std over seeds). Two runs that differ only in seed differ by more than 1.96 * sqrt(2) * std one time in 20.
SEED_GRID = Path("reports/distill_comparison.md")


def map_noise(root: Path) -> tuple[float, str] | None:
    """(95% bound of a reseeding's mAP50-95 change, where it comes from) from the committed seed grid, or None."""
    found = seed_grid_std(Path(root) / SEED_GRID)
    if found is None:
        return None
    return 1.96 * math.sqrt(2) * found[0], f"{found[1]}-seed grid, {SEED_GRID}"


@dataclass(frozen=True)
class Row:
    """One metric of one file, both sides."""

    file: str
    key: str
    old: Any
    new: Any
    map_noise: tuple[float, str] | None = None  # `map_noise()`: no mAP change is called noise without it
    image_noise: float | None = None  # 95% bound of the change from the two sides' bootstrap std over the images

    @property
    def change(self) -> float | None:
        if _num(self.old) and _num(self.new):
            return self.new - self.old
        return None

    def noise_note(self) -> str:
        """Why this change may be noise, or ''."""
        d = self.change
        if d is None or d == 0:
            return ""
        leaf = self.key.rsplit(".", 1)[-1]
        if any(t in leaf for t in TIME_KEYS) and self.old and abs(d / self.old) <= TIME_NOISE_REL:
            return f"within timing noise (±{TIME_NOISE_REL:.0%} on shared cores)"
        if "map" in leaf and self.map_noise and abs(d) <= self.map_noise[0]:
            return f"within seed spread (±{self.map_noise[0]:.4f}, {self.map_noise[1]})"
        if "map" in leaf and self.image_noise and abs(d) <= self.image_noise:
            return f"within the images' bootstrap noise (±{self.image_noise:.4f})"
        return ""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True)


def default_base(root: Path) -> str:
    """The last commit that changed dvc.lock, or the one before it when the workspace's dvc.lock is that commit's."""
    commits = _git(root, "log", "-2", "--format=%H", "--", "dvc.lock").stdout.decode().split()
    if commits and _git(root, "diff", "--quiet", commits[0], "--", "dvc.lock").returncode == 0:
        commits = commits[1:]
    if not commits:
        raise UserError(f"no earlier commit in {root.resolve()} changed dvc.lock, so there are no results to compare "
                        "against; pass BASE (a branch or commit that carries the results of `dvc repro`)")
    return commits[0]


def check_base(root: Path, base: str) -> str:
    """The commit BASE names; UserError when it is not a commit or holds no results."""
    proc = _git(root, "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}")
    if proc.returncode != 0:
        raise UserError(f"BASE {base!r} is not a commit in {root.resolve()}; give a branch or commit hash "
                        "(`git log --oneline -- dvc.lock` lists the commits that changed results)")
    commit = proc.stdout.decode().strip()
    if _git(root, "cat-file", "-e", f"{commit}:dvc.lock").returncode != 0 or not _git(
            root, "ls-tree", "-r", "--name-only", commit, "metrics/").stdout.strip():
        raise UserError(f"BASE {base!r} ({commit[:8]}) has no results (no dvc.lock or metrics/ committed there); "
                        "compare against a commit that carries the results of `dvc repro` "
                        "(`git log --oneline -- dvc.lock` lists them)")
    return commit


def _dvc_diffs(root: Path, base: str) -> tuple[dict, dict]:
    from dvc.repo import Repo  # imported here: `--help` and bad-BASE errors stay instant

    with Repo(str(root)) as repo:
        metrics = repo.metrics.diff(a_rev=base, all=True)
        params = repo.params.diff(a_rev=base)
    errors = metrics.get("errors") or {}
    for rev, per_file in errors.items():
        for path, err in (per_file.items() if isinstance(per_file, dict) else [("metrics", per_file)]):
            side = "the workspace" if rev == "workspace" else f"BASE {base!r}"
            raise UserError(f"{path} in {side} does not parse ({err}); rerun its stage, or fix the file")
    return metrics.get("diff", {}), params.get("diff", {})


def metric_rows(diff: dict[str, dict[str, dict[str, Any]]], noise: tuple[float, str] | None = None) -> list[Row]:
    """`dvc metrics diff --all` result -> rows, files and keys in a stable order. A score with a bootstrap std on both
    sides (the evaluate stage's `<key>_std`) gets the bound of their difference, 1.96 * sqrt(std_old² + std_new²):
    the two runs' models are scored on the same images, so this unpaired bound is on the safe side."""
    rows = []
    for f in sorted(diff):
        for k, v in sorted(diff[f].items()):
            std = diff[f].get(f"{k}_std", {})
            bound = (1.96 * math.hypot(std["old"], std["new"]) if _num(std.get("old")) and _num(std.get("new"))
                     else None)
            rows.append(Row(f, k, v.get("old"), v.get("new"), noise, bound))
    return rows


def split_headline(rows: Iterable[Row]) -> tuple[list[Row], list[Row]]:
    """(headline rows in HEADLINE order, other rows whose value changed)."""
    rows = list(rows)
    head = [r for pattern, key, _ in HEADLINE for r in rows if r.key == key and fnmatch.fnmatch(r.file, pattern)]
    rest = [r for r in rows if r not in head and r.old != r.new]
    return head, rest


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if _num(v):
        return str(v) if isinstance(v, int) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _row_line(r: Row, label: str | None = None) -> str:
    d = r.change
    rel = f" ({d / r.old:+.1%})" if d is not None and r.old else ""
    change = "" if d is None else ("0" if d == 0 else f"{d:+.4g}{rel}")
    name = f"{label} — `{Path(r.file).stem}`" if label else f"`{r.file}` {r.key}"
    return f"| {name} | {_fmt(r.old)} | {_fmt(r.new)} | {change} | {r.noise_note()} |"


def _label(r: Row) -> str:
    return next(lbl for pattern, key, lbl in HEADLINE if r.key == key and fnmatch.fnmatch(r.file, pattern))


def _show(root: Path, commit: str, path: str) -> bytes | None:
    proc = _git(root, "show", f"{commit}:{path}")
    return proc.stdout if proc.returncode == 0 else None


Plot = tuple[str, list[tuple[str, str]]]  # title, [(caption, image file beside the page, or '' when absent)]


def plot_pairs(root: Path, commit: str, out_dir: Path) -> list[Plot]:
    """Every plot in dvc.yaml that differs from BASE, both sides; images are written to out_dir.

    Image plots (PNG outs) are shown side by side; data plots (the top-level `plots:` of dvc.yaml) are redrawn with
    both revisions in one chart.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    pairs: list[Plot] = []
    images = [next(iter(p)) if isinstance(p, dict) else p
              for stage in spec.get("stages", {}).values() for p in stage.get("plots", []) or []]
    for path in (p for p in images if p.endswith(".png")):
        old, new = _show(root, commit, path), (root / path).read_bytes() if (root / path).is_file() else None
        if old == new:
            continue
        shown = []
        for side, data in (("base", old), ("new", new)):
            name = f"{side}_{Path(path).name}"
            if data is not None:
                files.write_with(out_dir / name, lambda tmp, d=data: tmp.write_bytes(d))
            shown.append((side, name if data is not None else ""))
        pairs.append((path, shown))
    for definition in spec.get("plots", []) or []:
        title, d = next(iter(definition.items())) if isinstance(definition, dict) else (definition, {})
        ys = (d or {}).get("y", {})
        if not isinstance(ys, dict):
            continue
        sides = {}
        for side in ("base", "new"):
            series = {}
            for path in ys:
                raw = _show(root, commit, path) if side == "base" else (
                    (root / path).read_bytes() if (root / path).is_file() else None)
                try:
                    series[path] = json.loads(raw) if raw else []
                except json.JSONDecodeError:
                    raise UserError(f"{path} in {'BASE' if side == 'base' else 'the workspace'} does not parse; "
                                    "rerun its stage") from None
            sides[side] = series
        if sides["base"] == sides["new"]:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for side, style in (("base", "--"), ("new", "-")):
            for path, rows in sides[side].items():
                y = ys[path]
                pts = [(r[d.get("x", "step")], r[y]) for r in rows if isinstance(r, dict) and _num(r.get(y))
                       and _num(r.get(d.get("x", "step")))]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", ms=3, label=f"{side}: {Path(path).stem}")
        ax.set_xlabel(d.get("x", "step"))
        ax.set_title(title)
        ax.legend(fontsize=7)
        name = "plot_" + "".join(c if c.isalnum() else "_" for c in title) + ".png"
        files.write_with(out_dir / name, lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=90, bbox_inches="tight"))
        plt.close(fig)
        pairs.append((title, [("dashed: base, solid: new", name)]))
    return pairs


def build_page(base: str, commit: str, rows: list[Row], params: dict, plots: list[Plot],
               stale: dict[str, list[str]], code_changed: dict[str, list[str]]) -> str:
    """The markdown page: a pure function of what was read."""
    head, rest = split_headline(rows)
    out = [f"# Review against `{base}` ({commit[:8]})", ""]
    if stale:
        out += ["**Stale results**: these stages' params or commands differ from `dvc.lock`, so their numbers are "
                "not what `dvc repro` gives now: " + "; ".join(f"`{s}` ({', '.join(w)})" for s, w in stale.items()),
                ""]
    out += [f"Freshness: {describe_code_changes(code_changed)}.", ""]
    table = ["| metric | base | new | change | noise |", "|---|---|---|---|---|"]
    out += ["## Headline", "", *table, *(_row_line(r, _label(r)) for r in head)] if head else [
        "## Headline", "", "No headline metric in either revision."]
    noisy = [r for r in head + rest if r.noise_note()]
    if noisy:
        out += ["", f"{len(noisy)} change(s) are within the measured noise (marked above): do not read them as "
                "effects."]
    out += ["", "## Params", ""]
    prow = [(f, k, v) for f in sorted(params) for k, v in sorted(params[f].items())]
    out += (["| param | base | new |", "|---|---|---|",
             *(f"| `{k}` | {_fmt(v.get('old'))} | {_fmt(v.get('new'))} |" for f, k, v in prow)]
            if prow else ["No params changed."])
    out += ["", "## Other metrics that changed", ""]
    out += [*table, *(_row_line(r) for r in rest)] if rest else ["None."]
    out += ["", "## Plots", ""]
    if not plots:
        out.append("No plot changed.")
    for title, shown in plots:
        cells = [f"![{caption}]({img})" if img else "(absent)" for caption, img in shown]
        out += [f"### {title}", "", "| " + " | ".join(c for c, _ in shown) + " |", "|---" * len(shown) + "|",
                "| " + " | ".join(cells) + " |", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", metavar="BASE", nargs="?",
                    help="branch or commit to compare against (default: the last commit that changed dvc.lock)")
    ap.add_argument("--out", type=Path, default=Path("reports/review/review.md"),
                    help="markdown page; plot images go beside it")
    ap.add_argument("--root", type=Path, default=Path("."), help="the repo (default: current folder)")
    args = ap.parse_args(argv)
    try:
        base = args.base or default_base(args.root)
        commit = check_base(args.root, base)
        found = check(args.root)
        metrics, params = _dvc_diffs(args.root, commit)
        plots = plot_pairs(args.root, commit, args.out.parent)
        rows = metric_rows(metrics, map_noise(args.root))
        page = build_page(base, commit, rows, params, plots, found.stale, found.code_changed)
        files.write_text(args.out, page)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0

