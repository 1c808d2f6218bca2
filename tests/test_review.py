"""Committed results and their review: the freshness check CI runs, the review page, experiments shared through remotes.

Fast tests drive real git and DVC on a two-stage toy pipeline made here (its numbers come from params); the e2e test
runs the real pipeline's experiment, review and push/pull on the tiny repo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import astuple
from pathlib import Path

import pytest
import yaml

from yolo_compress.errors import UserError
from yolo_compress.review.freshness import check
from yolo_compress.review.page import SEED_GRID, Row, default_base, map_noise, metric_rows, split_headline

from .tiny_pipeline import GIT, REPO, clean_env, copy_repo, run

TOY_STAGE = '''
import json, sys, yaml
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
p = yaml.safe_load(open("params.yaml"))["toy"]
json.dump({"test": {"map50_95": p["map"], "map50": p["map"] + 0.2}}, open("metrics/evaluate/student.json", "w"))
json.dump({"model": {"gflops": p["gflops"], "params_m": 1.0, "size_mb": 2.0},
           "torch": {"latency_ms_p50": p["latency"], "flagged": 0},
           "onnx": {"latency_ms_p50": p["latency"], "flagged": 0}},
          open("metrics/benchmark/student.json", "w"))
json.dump([{"round": r, "gflops": p["gflops"] / (r + 1)} for r in range(p["rounds"])], open("plots/prune.json", "w"))
plt.plot([1, 2], [p["map"], p["map"]]); plt.savefig("reports/pareto.png")
'''
TOY_DVC = {
    "stages": {"toy": {
        "cmd": "python toy.py",
        "deps": ["toy.py"],
        "params": ["toy"],
        "metrics": [{"metrics/evaluate/student.json": {"cache": False}}, {"metrics/benchmark/student.json":
                                                                           {"cache": False}}],
        "plots": [{"plots/prune.json": {"cache": False}}, {"reports/pareto.png": {"cache": False}}],
    }},
    "plots": [{"prune rounds": {"x": "round", "y": {"plots/prune.json": "gflops"}}}],
}
TOY_PARAMS = {"toy": {"map": 0.30, "gflops": 1.0, "latency": 10.0, "rounds": 2,
                      "alpha": 2e-5}}  # dvc.lock writes 2e-05, a string to a YAML 1.1 reader: must still compare equal


def _commit(root: Path, env: dict[str, str], message: str) -> str:
    run([*GIT, "add", "-A"], root, env)
    run([*GIT, "commit", "-qm", message], root, env)
    return run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()


def _set(root: Path, **values: float) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["toy"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A git + DVC repo whose one stage writes metrics, plots and a PNG from params; results committed."""
    root, env = tmp_path / "toy", clean_env()
    for folder in ("metrics/evaluate", "metrics/benchmark", "plots", "reports"):
        (root / folder).mkdir(parents=True)
    (root / "toy.py").write_text(TOY_STAGE)
    (root / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(TOY_PARAMS, sort_keys=False))
    run(["git", "init", "-q", "-b", "main"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["dvc", "repro"], root, env)
    _commit(root, env, "toy results")
    return root, env


def freshness_cli(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "yolo_compress.review.freshness", "--root", str(root)], root, env, check=False)


def test_fresh_results_pass_and_a_params_edit_without_rerun_fails_with_one_line(toy: tuple[Path, dict]) -> None:
    root, env = toy
    assert freshness_cli(root, env).returncode == 0
    _set(root, rounds=3)
    _commit(root, env, "params edited, results not refreshed")
    proc = freshness_cli(root, env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: committed results are stale for stages toy (toy.rounds: 2 -> 3); run `dvc repro` and commit dvc.lock, "
        "metrics/, plots/ and reports/ with the change"]


def test_a_typo_key_makes_the_section_stale(toy: tuple[Path, dict]) -> None:
    root, _ = toy
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["toy"]["round"] = 3  # a typo of `rounds`: DVC tracks the whole section, so this is a change
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    assert check(root).stale == {"toy": ["toy.round: (absent) -> 3"]}


def test_code_change_is_reported_without_failing(toy: tuple[Path, dict]) -> None:
    root, env = toy
    with (root / "toy.py").open("a") as f:
        f.write("# a refactor\n")
    found = check(root)
    assert found.stale == {} and found.code_changed == {"toy": ["toy.py"]}
    proc = freshness_cli(root, env)
    assert proc.returncode == 0
    assert "code changed since these results were made (numbers may be out of date): toy (toy.py)" in proc.stdout


def test_metrics_missing_a_key_the_report_reads_fail(toy: tuple[Path, dict]) -> None:
    root, env = toy
    bench = root / "metrics/benchmark/student.json"
    data = json.loads(bench.read_text())
    del data["model"]["gflops"]
    bench.write_text(json.dumps(data))
    assert check(root).missing_keys == [f"{root}/metrics/benchmark/student.json: model.gflops"]
    assert "lack keys the report reads" in freshness_cli(root, env).stderr


def test_no_lock_is_one_line(toy: tuple[Path, dict]) -> None:
    root, env = toy
    (root / "dvc.lock").unlink()
    proc = freshness_cli(root, env)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "dvc.lock: not found" in proc.stderr


def test_this_repo_carries_fresh_results() -> None:
    """What CI checks: main's dvc.lock and metrics are those of main's params.yaml and dvc.yaml."""
    found = check(REPO)
    assert found.stale == {} and found.missing_keys == []


def review(root: Path, env: dict[str, str], base: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "yolo_compress.review", base, "--root", str(root),
                "--out", str(root / "reports/review/review.md")], root, env, check=False)


def test_review_of_two_commits_puts_headline_first_flags_noise_and_shows_plots(toy: tuple[Path, dict]) -> None:
    root, env = toy
    base = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    (root / "reports").mkdir(exist_ok=True)  # the committed seed grid that the mAP noise bound comes from
    (root / SEED_GRID).write_text("Plain student (baseline), val mAP50-95: 0.3000 ± 0.0100 (seeds 0 1 2). ...\n")
    _set(root, map=0.305, gflops=0.5, latency=12.0, rounds=3)  # mAP within seed spread, latency within timing noise
    run(["dvc", "repro"], root, env)
    _commit(root, env, "prune harder")
    t0 = time.perf_counter()
    proc = review(root, env, base)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 10
    page = (root / "reports/review/review.md").read_text()
    assert page.index("## Headline") < page.index("## Params") < page.index("## Other metrics") < page.index("## Plots")
    head = page[page.index("## Headline"):page.index("## Params")]
    assert head.index("test mAP50-95") < head.index("GFLOPs") < head.index("ONNX Runtime latency")
    assert "| GFLOPs — `student` | 1 | 0.5 | -0.5 (-50.0%) |  |" in head  # a real change: no noise note
    assert "within seed spread" in head and "within timing noise" in head
    assert "| `toy.rounds` | 2 | 3 |" in page
    for image in ("base_pareto.png", "new_pareto.png", "plot_prune_rounds.png"):
        assert f"]({image})" in page and (root / "reports/review" / image).stat().st_size > 1000
    assert "Freshness: no stage's code changed" in page


@pytest.mark.parametrize("case", ["no-such-ref", "no-results", "broken-metrics"])
def test_review_bad_input_is_one_line(toy: tuple[Path, dict], case: str) -> None:
    root, env = toy
    base = "HEAD"
    if case == "no-such-ref":
        base, expected = "nope", "BASE 'nope' is not a commit"
    elif case == "no-results":
        base = run(["git", "rev-list", "--max-parents=0", "HEAD"], root, env).stdout.strip()
        run([*GIT, "checkout", "-q", "--orphan", "empty"], root, env)
        run([*GIT, "rm", "-rqf", "--cached", "."], root, env)
        (root / "README").write_text("no results here\n")
        run([*GIT, "add", "README"], root, env)
        run([*GIT, "commit", "-qm", "empty"], root, env)
        base = "empty"
        run([*GIT, "checkout", "-qf", "main"], root, env)
        expected = "has no results"
    else:
        (root / "metrics/evaluate/student.json").write_text('{"test": ')
        expected = "does not parse"
    proc = review(root, env, base)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def test_split_headline_orders_rows_and_keeps_only_changed_others() -> None:
    rows = [Row("metrics/benchmark/pruned.json", "model.gflops", 1.0, 0.4),
            Row("metrics/evaluate/pruned.json", "test.map50_95", 0.2, 0.195),
            Row("metrics/evaluate/pruned.json", "val.map50_95", 0.2, 0.2),
            Row("metrics/evaluate/pruned.json", "val.map50", 0.4, 0.3)]
    head, rest = split_headline(rows)
    assert [r.key for r in head] == ["test.map50_95", "model.gflops"]
    assert rest == [rows[3]]
    assert rows[1].noise_note() == ""  # no seed grid given: no mAP change is called noise
    noisy = Row(*astuple(rows[1])[:4], map_noise=(0.01, "grid"))
    assert noisy.noise_note() == "within seed spread (±0.0100, grid)"
    assert Row("f", "test.map50_95", 0.2, 0.22, (0.01, "grid")).noise_note() == ""
    assert Row("f", "onnx.latency_ms_p50", 10.0, 13.0).noise_note().startswith("within timing noise")
    assert Row("f", "onnx.latency_ms_p50", 10.0, 14.0).noise_note() == ""


def test_share_stops_on_an_unreachable_remote_with_one_line(toy: tuple[Path, dict], tmp_path: Path) -> None:
    root, env = toy
    run(["git", "remote", "add", "origin", str(tmp_path / "no-such-repo.git")], root, env)
    proc = run([sys.executable, "-m", "yolo_compress.review.share", "push", "origin", "--root", str(root)], root, env,
               check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: git remote 'origin'") and "not reachable" in lines[0]
    run(["git", "init", "-q", "--bare", str(tmp_path / "ok.git")], root, env)
    run(["git", "remote", "set-url", "origin", str(tmp_path / "ok.git")], root, env)
    proc = run([sys.executable, "-m", "yolo_compress.review.share", "push", "--root", str(root)], root, env,
               check=False)
    assert proc.returncode == 2 and "no default DVC remote" in proc.stderr
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "gone")], root, env)
    proc = run([sys.executable, "-m", "yolo_compress.review.share", "push", "--root", str(root)], root, env,
               check=False)
    assert proc.returncode == 2 and "DVC remote 'shared'" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.e2e
def test_experiment_review_and_sharing_between_two_machines(tiny_repo: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    """`dvc exp run -S prune.target=0.7`, the review page, then push to shared remotes and pull on a second clone."""
    root, env = copy_repo(tiny_repo[0], tmp_path / "repo"), tiny_repo[1]
    run(["git", "init", "-q", "--bare", str(tmp_path / "team.git")], root, env)
    run(["git", "remote", "add", "origin", str(tmp_path / "team.git")], root, env)
    (tmp_path / "team-cache").mkdir()
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "team-cache")], root, env)
    base = _commit(root, env, "team remotes")
    run(["git", "push", "-q", "origin", "main"], root, env)
    run(["dvc", "push", "-q"], root, env)

    run(["dvc", "exp", "run", "-n", "harder", "-S", "prune.target=0.7"], root, env)
    t0 = time.perf_counter()
    proc = review(root, env, base)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - t0 < 10
    page = (root / "reports/review/review.md").read_text()
    head = page[page.index("## Headline"):page.index("## Params")]
    for label in ("test mAP50-95 — `pruned`", "GFLOPs — `pruned`", "ONNX Runtime latency p50 (ms) — `pruned_int8`",
                  "distillation gain (mAP50-95) — `distill`"):
        assert label in head
    assert "| `prune.target` | 0.5 | 0.7 |" in page
    assert "### prune rounds, val mAP50-95 vs GFLOPs" in page  # the prune curve changed: redrawn, both sides

    run([sys.executable, "-m", "yolo_compress.review.share", "push", "origin"], root, env)
    mate = tmp_path / "teammate"
    run(["git", "clone", "-q", "-b", "main", str(tmp_path / "team.git"), str(mate)], tmp_path, env)
    out = run([sys.executable, "-m", "yolo_compress.review.share", "pull", "origin"], mate, env).stdout
    assert "harder" in out
    shown = json.loads(run(["dvc", "exp", "show", "--json"], mate, env).stdout)
    exps = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == "harder"]
    assert exps, shown
    params = exps[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["prune"]["target"] == 0.7
    mine = json.loads((root / "metrics/prune.json").read_text())
    theirs = exps[0]["revs"][0]["data"]["metrics"]["metrics/prune.json"]["data"]
    assert theirs["pruned"]["gflops"] == mine["pruned"]["gflops"]
    run(["dvc", "exp", "apply", "harder"], mate, env)
    run(["dvc", "pull", "-q", "models/pruned.pt"], mate, env)  # the model travelled through the DVC remote
    assert (mate / "models/pruned.pt").read_bytes() == (root / "models/pruned.pt").read_bytes()


def test_map_noise_comes_from_the_committed_seed_grid(tmp_path: Path) -> None:
    from yolo_compress.experiments.compare_distill import format_table

    # the line compare_distill writes is the line review reads
    (tmp_path / "reports").mkdir()
    (tmp_path / SEED_GRID).write_text(format_table([], student=(0.36, 0.05)).replace("(seeds )", "(seeds 0 1 2)"))
    bound, source = map_noise(tmp_path)
    assert bound == pytest.approx(1.96 * 2 ** 0.5 * 0.05) and source.startswith("3-seed grid")
    assert map_noise(REPO) is not None  # the committed grid parses
    assert map_noise(tmp_path / "nowhere") is None


def test_default_base_is_the_last_results_commit_before_the_workspace(tmp_path: Path) -> None:
    env = clean_env()

    def commit(text: str) -> str:
        (tmp_path / "dvc.lock").write_text(text)
        run([*GIT, "add", "dvc.lock"], tmp_path, env)
        run([*GIT, "commit", "-q", "-m", text], tmp_path, env)
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    run([*GIT, "init", "-q"], tmp_path, env)
    with pytest.raises(UserError, match="no earlier commit"):
        default_base(tmp_path)
    first = commit("a")
    second = commit("b")
    (tmp_path / "other").write_text("x")  # a later commit that leaves results alone
    run([*GIT, "add", "other"], tmp_path, env)
    run([*GIT, "commit", "-q", "-m", "other"], tmp_path, env)
    assert default_base(tmp_path) == first  # the workspace holds second's results: compare with the ones before
    (tmp_path / "dvc.lock").write_text("c")  # a fresh `dvc repro`, not committed yet
    assert default_base(tmp_path) == second


def test_a_score_change_within_both_sides_bootstrap_noise_is_flagged_as_such() -> None:
    diff = {"metrics/evaluate/pruned.json": {
        "test.map50_95": {"old": 0.60, "new": 0.57},
        "test.map50_95_std": {"old": 0.012, "new": 0.013},
        "val.map50_95": {"old": 0.60, "new": 0.50},
        "val.map50_95_std": {"old": 0.012, "new": 0.013},
    }}
    rows = {r.key: r for r in metric_rows(diff)}
    bound = 1.96 * (0.012 ** 2 + 0.013 ** 2) ** 0.5
    assert rows["test.map50_95"].noise_note() == f"within the images' bootstrap noise (±{bound:.4f})"
    assert rows["val.map50_95"].noise_note() == ""  # 0.10 is well outside it
