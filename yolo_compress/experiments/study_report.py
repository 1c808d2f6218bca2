"""reports/study.md and its JSON twin, from what yolo_compress.experiments.study collected (pure: text in, text out)."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

from yolo_compress.experiments.compare_distill import mean_std
from yolo_compress.experiments.study_plan import (
    PLAIN,
    REFERENCE,
    SPLITS,
    MethodRow,
    Scored,
    StudyConfig,
    StudyPart,
    method_rows,
    plateau_gain,
    plateaued,
    verdict,
)

MIN_GAIN = 0.015  # the distillation target: +1.5 mAP50-95 points over the plain student, paired, at the plateau
MAX_PRUNE_DROP, MIN_GFLOPS_CUT = 0.010, 0.60  # the pruning target, on test and on test_shift


def to_scored(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[int, Scored]]:
    return {m: {s: Scored(s, r["scores"], r["seconds_per_epoch"]) for s, r in by_seed.items()}
            for m, by_seed in runs.items()}


def _pm(ms: tuple[float, float] | None, points: bool = False) -> str:
    if ms is None:
        return "-"
    k = 100 if points else 1
    return f"{ms[0] * k:+.2f} ± {ms[1] * k:.2f}" if points else f"{ms[0]:.4f} ± {ms[1]:.4f}"


def _per_seed(gains: list[float]) -> str:
    """Paired gains in points: mean ± std, then each seed's."""
    return f"{_pm(mean_std(gains), True)} ({', '.join(f'{g * 100:+.2f}' for g in gains)})"


def _seed_differences(a: dict[int, Any], b: dict[int, Any],
                      splits: tuple[str, ...]) -> tuple[list[int], dict[str, list[float]]]:
    """The seeds both {seed: {"scores": ...}} have, and per split a's score minus b's on each of them."""
    seeds = sorted(set(a) & set(b))
    return seeds, {s: [a[seed]["scores"][s] - b[seed]["scores"][s] for seed in seeds] for s in splits}


def _plateau(curve: list[float], bound: float) -> str:
    g = plateau_gain(curve)
    if g is None:
        return f"too few epochs ({len(curve)}) to judge"
    if max(curve) < bound:  # plateaued() says False here too; the text says why
        return f"NOT plateaued: nothing learnt yet (best val {max(curve):.4f})"
    return f"{'plateaued' if plateaued(curve, bound) else 'NOT plateaued'} (last quarter gained {g * 100:+.2f} points)"


def _plateau_json(curve: list[float], bound: float) -> dict[str, Any]:
    return {"plateau_gain": plateau_gain(curve), "plateaued": plateaued(curve, bound)}


def method_table(rows: list[MethodRow]) -> list[str]:
    lines = ["| method | seeds | " + " | ".join(SPLITS) + " | gain vs plain, test | gain vs plain, test_shift "
             f"| vs {REFERENCE}, test | time/epoch vs plain |", "|---" * 9 + "|"]
    for r in rows:
        ref = (r.gain_vs_reference or {}).get("test")
        time = "-" if r.time_ratio is None else f"{r.time_ratio[0]:.2f}x ± {r.time_ratio[1]:.2f}"
        lines.append(f"| {r.method} | {' '.join(map(str, r.seeds))} | "
                     + " | ".join(_pm(r.scores.get(s)) for s in SPLITS)
                     + f" | {_pm(r.gain_vs_plain.get('test'), True)} | {_pm(r.gain_vs_plain.get('test_shift'), True)}"
                     f" | {_pm(ref, True)} | {time} |")
    return lines


def prune_row(r: dict[str, Any]) -> tuple[float | None, dict[str, float], bool]:
    """GFLOPs removed by the kept round, points lost per split against its epoch-matched control (the model it pruned,
    fine-tuned as long; records from before the control: against the model it pruned), and the target verdict."""
    cut = r["metrics"].get("ratio", {}).get("gflops_removed")
    ref = r.get("control") or r["distilled"]
    drops = {s: ref[s] - r["scores"][s] for s in ref if s in r["scores"]}
    ok = (cut is not None and cut >= MIN_GFLOPS_CUT
          and all(s in drops and drops[s] <= MAX_PRUNE_DROP for s in ("test", "test_shift")))
    return cut, drops, ok


def prune_section(best: list[str], schedule: str, recipes: dict[str, dict[int, Any]]) -> tuple[list[str], dict]:
    """One row per prune recipe and pruned seed: GFLOPs removed by the kept round (chosen on val), points lost on
    each split, the val score after every round's fine-tune (so a recipe that stopped early still shows how far it
    got), and per recipe pruned on several seeds the mean ± std of what it lost."""
    distilled = {seed: r["distilled"] for by_seed in recipes.values() for seed, r in sorted(by_seed.items())}
    splits = list(next(iter(distilled.values())))
    lines = [f"### Pruning {', '.join(f'`{b}`' for b in best)} (distilled, `{schedule}`; "
             f"{'the best on val' if len(best) == 1 else 'the loss best on mean val, one model per seed'})", "",
             "Distilled model" + ("s" if len(distilled) > 1 else "") + ": " + "; ".join(
                 f"seed {seed}: " + ", ".join(f"{s} {v:.4f}" for s, v in scores.items())
                 for seed, scores in sorted(distilled.items())) + ". Target: >= "
             f"{MIN_GFLOPS_CUT:.0%} fewer GFLOPs, <= {MAX_PRUNE_DROP * 100:.1f} point lost on test and test_shift, "
             "against the epoch-matched control (the distilled model fine-tuned as long, unpruned; `distilled` "
             "marks a record from before the control: lost against the model it pruned).", "",
             "| recipe | seed | overrides | rounds run | kept | GFLOPs removed | "
             + " | ".join(f"lost, {s}" for s in splits) + " | against | target |", "|---" * (8 + len(splits)) + "|"]
    summary: dict[str, Any] = {}
    curves, over_seeds = [], []
    for recipe, by_seed in recipes.items():
        summary[recipe] = {}
        for seed, r in sorted(by_seed.items()):
            m = r["metrics"]
            cut, drops, ok = prune_row(r)
            overrides = ", ".join(f"{k.removeprefix('prune.')} {json.dumps(v)}" for k, v in r["overrides"].items())
            lines.append(f"| {recipe} | {seed} | {overrides or '-'} | {m['pruned'].get('rounds_done', '?')} | "
                         f"{m['pruned'].get('best_round', '?')} | {'?' if cut is None else f'{cut:.1%}'} | "
                         + " | ".join(f"{drops[s] * 100:+.2f}" if s in drops else "-" for s in splits)
                         + f" | {'control' if r.get('control') else 'distilled'} | **{'met' if ok else 'missed'}** |")
            base = r["rounds"][0]["gflops"]
            curves.append(f"- `{recipe}`, seed {seed}: " + ", ".join(
                f"r{row['round']} {row['map50_95_before']:.3f} -> {row['map50_95_after']:.3f} "
                f"({1 - row['gflops'] / base:.0%})" for row in r["rounds"][1:]))
            summary[recipe][seed] = {"experiment": r["experiment"], "overrides": r["overrides"],
                                     "gflops_reduction": cut, "scores": r["scores"], "distilled": r["distilled"],
                                     "lost": drops, "target_met": ok, "rounds": r["rounds"]}
        rows = list(summary[recipe].values())
        if len(rows) > 1:
            lost = {s: mean_std([row["lost"][s] for row in rows]) for s in splits
                    if all(s in row["lost"] for row in rows)}
            over_seeds.append(f"- `{recipe}` over seeds {' '.join(map(str, sorted(by_seed)))}: lost "
                              + ", ".join(f"{_pm(v, True)} on {s}" for s, v in lost.items())
                              + f"; target met on {sum(row['target_met'] for row in rows)} of {len(rows)} seeds.")
    if over_seeds:
        lines += ["", *over_seeds]
    lines += ["", "Val mAP50-95 of each round, straight after pruning -> after its fine-tune (GFLOPs removed):", "",
              *curves]
    return lines, summary


def kd_recovery(recipes: dict[str, dict[int, Any]]) -> tuple[list[str], dict[str, Any]]:
    """Each recipe that fine-tunes with distillation against the recipe that is the same without it (prune.distill
    false, no prune.teacher): its pruned model's score minus that one's, paired by seed, on test and test_shift."""
    overrides_of = {name: next(iter(by_seed.values()))["overrides"] for name, by_seed in recipes.items()}
    plain = {json.dumps({k: v for k, v in o.items() if k != "prune.distill"}, sort_keys=True): name
             for name, o in overrides_of.items() if o.get("prune.distill") is False and "prune.teacher" not in o}
    lines, summary = [], {}
    for name, by_seed in recipes.items():
        overrides = overrides_of[name]
        if not overrides.get("prune.distill"):
            continue
        rest = {k: v for k, v in overrides.items() if k not in ("prune.distill", "prune.teacher")}
        base = plain.get(json.dumps(rest, sort_keys=True))
        seeds, gain = _seed_differences(by_seed, recipes.get(base, {}), ("test", "test_shift"))
        if not seeds:
            continue
        never_worse = all(g >= 0 for values in gain.values() for g in values)
        summary[name] = {"against": base, "seeds": seeds, "gain": gain, "never_worse": never_worse}
        lines.append(f"| {name} | {base} | {' '.join(map(str, seeds))} | "
                     + " | ".join(_per_seed(v) for v in gain.values())
                     + f" | **{'yes' if never_worse else 'no'}** |")
    if not lines:
        return [], {}
    head = ["### Pruning recovery: with distillation against without", "",
            "The pruned model of each recipe that fine-tunes with a teacher, minus the pruned model of the same "
            "recipe without one, paired by seed (mean ± std, then each seed, in points). The target: with "
            "distillation at least as good on test and test_shift on every seed.", "",
            "| recipe | against | seeds | test | test_shift | never worse |", "|---" * 6 + "|"]
    return [*head, *lines], summary


def against_section(name: str, part: StudyPart, got: dict[str, Any], other_part: StudyPart,
                    other: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """This part's students minus those of the part it names (`part.against`), paired by seed, on every split: each
    loss against the same loss; where the two parts' plain students differ (another schedule, say), also plain
    against plain and this part's plain against each of the other's losses (the other's students checked against
    a control trained longer)."""
    mine = got.get("schedules", {}).get(part.longest, {}).get("runs", {})
    theirs = other.get("schedules", {}).get(other_part.longest, {}).get("runs", {})
    plain_seeds = sorted(set(mine.get(PLAIN, {})) & set(theirs.get(PLAIN, {})))
    same_plain = bool(plain_seeds) and all(mine[PLAIN][s]["scores"] == theirs[PLAIN][s]["scores"]
                                           for s in plain_seeds)
    pairs = [(m, m) for m in part.losses]
    if not same_plain:
        pairs = [(PLAIN, PLAIN), *pairs, *((PLAIN, m) for m in theirs if m != PLAIN)]
    rows, summary = [], {}
    for m, m2 in pairs:
        seeds, gain = _seed_differences(mine.get(m, {}), theirs.get(m2, {}), SPLITS)
        if not seeds:
            continue
        summary[f"{m} - {m2}"] = {"seeds": seeds, "gain": gain}
        rows.append(f"| {m} | {m2} | {' '.join(map(str, seeds))} | "
                    + " | ".join(_per_seed(v) for v in gain.values()) + " |")
    if not rows:
        return [], {}
    summary["plain_students_equal"] = same_plain
    return [f"### `{name}` against `{part.against}`", "",
            f"This part's students (schedule `{part.longest}`) minus `{part.against}`'s (its longest schedule), "
            "paired by seed (mean ± std, then each seed, in points). The plain students of the two parts "
            + ("score the same on every split (the same models, shared by DVC's run cache)." if same_plain else
               "differ, so each part's students are also set against the other's plain ones."), "",
            f"| {name} | {part.against} | seeds | " + " | ".join(SPLITS) + " |", "|---" * (3 + len(SPLITS)) + "|",
            *rows], summary


def part_section(name: str, part: StudyPart, got: dict[str, Any], bound: float,
                 rerun: str = "python -m yolo_compress.experiments.study") -> tuple[list[str], dict[str, Any]]:
    p = part.params
    lines = [f"## {name}: {p.get('teacher.model', '?')} -> {p.get('student.model', 'yolo11n.yaml')}, "
             f"data {p.get('data.source', 'synthetic')} ({p.get('data.task', 'detect')}), "
             f"{p.get('student.imgsz', '?')} px, scored by {part.metric} (pycocotools)", ""]
    summary: dict[str, Any] = {"metric": part.metric, "schedules": {}}
    if "error" in got:
        return [*lines, f"Not collected: {got['error']}; fix it and rerun with --collect-only."], dict(got)
    if got.get("commits"):
        lines += [f"Experiments ran the code of commit {', '.join(got['commits'])}.", ""]
        summary["commits"] = got["commits"]
    teacher = got.get("teacher")
    if teacher:
        lines.append(f"Teacher: {len(teacher['curve'])} epochs, {_plateau(teacher['curve'], bound)}; "
                     + ", ".join(f"{s} {v:.4f}" for s, v in teacher["scores"].items())
                     + f"; {teacher['gflops'] / teacher['student_gflops']:.2f}x the student's GFLOPs.")
        summary["teacher"] = {"scores": teacher["scores"], **_plateau_json(teacher["curve"], bound)}
    for schedule, sched in got["schedules"].items():
        rows = method_rows(to_scored(sched["runs"]))
        curves = [r["curve"] for r in sched["runs"].get(PLAIN, {}).values()]
        lines += ["", f"### Schedule `{schedule}`: {sched['epochs']} student epochs", ""]
        if curves:
            lines.append("Plain students: " + "; ".join(f"seed {s}: {_plateau(r['curve'], bound)}"
                                                       for s, r in sorted(sched["runs"][PLAIN].items())) + ".")
            lines.append("")
        lines += method_table(rows)
        judged = [r for r in rows if r.method not in (PLAIN, REFERENCE)]
        if schedule == part.longest and judged:
            lines.append("")
            lines += [f"- **{r.method}**, on test: {verdict(r, 'test', MIN_GAIN)}; on test_shift: "
                      f"{verdict(r, 'test_shift', MIN_GAIN)}." for r in judged]
        summary["schedules"][schedule] = {
            "epochs": sched["epochs"],
            "rows": [{"method": r.method, "seeds": r.seeds, "scores": r.scores, "gain_vs_plain": r.gain_vs_plain,
                      "gain_vs_reference": r.gain_vs_reference, "time_ratio": r.time_ratio} for r in rows],
            "plain_plateau": {s: _plateau_json(r["curve"], bound) for s, r in sched["runs"].get(PLAIN, {}).items()}}
    if got.get("prune"):
        prune_lines, summary["prune"] = prune_section(got["best"], part.longest, got["prune"])
        lines += ["", *prune_lines]
        recovery_lines, summary["kd_recovery"] = kd_recovery(got["prune"])
        lines += ["", *recovery_lines] if recovery_lines else []
    if got.get("overhead"):
        body = got["overhead"].split("\n", 2)[2] if got["overhead"].startswith("#") else got["overhead"]
        lines += ["", "### Distillation time, side by side in one process", "", body.strip()]
    if got["missing"]:
        lines += ["", f"Not finished yet (rerun `{rerun}` to continue): "
                  f"{', '.join(got['missing'])}."]
    summary["missing"] = got["missing"]
    return lines, summary


def format_study(study: StudyConfig, collected: dict[str, dict[str, Any]], commit: str,
                 config: str = "study.yaml") -> tuple[str, dict[str, Any]]:
    """The Markdown report and a JSON-ready summary of the same numbers."""
    lines = ["# Study: distillation and pruning in the users' setting", "",
             f"Collected by `python -m yolo_compress.experiments.study` from {config} at commit {commit}, on "
             f"{platform.machine()} with {os.cpu_count()} CPUs; each part names the commits its experiments ran. "
             "Scores are pycocotools on each split (box mAP50-95; OKS keypoint AP for pose); ± is the std over "
             "seeds; gains are paired by `student.seed` (mean ± std of the per-seed differences, in points = 1/100 "
             "of the score). Time/epoch comes from the separate experiments; the side-by-side table below it is the "
             "one to quote.", ""]
    summary: dict[str, Any] = {"commit": commit, "parts": {}}
    for name, got in collected.items():
        rerun = "python -m yolo_compress.experiments.study" + ("" if config == "study.yaml" else f" --config {config}")
        part = study.parts[name]
        part_lines, summary["parts"][name] = part_section(name, part, got, study.plateau_gain, rerun)
        if part.against and "error" not in got:
            against_lines, against = against_section(name, part, got, study.parts[part.against],
                                                     collected.get(part.against, {}))
            if against_lines:
                part_lines += ["", *against_lines]
                summary["parts"][name]["against"] = against
        lines += [*part_lines, ""]
    return "\n".join(lines), summary
