"""distill_overhead: the rotation and ratio math, and one real side-by-side run on the tiny pipeline's data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from yolo_compress.experiments.distill_overhead import PLAIN, main, ratios, rotated


def test_each_method_runs_first_once_per_cycle_of_rounds() -> None:
    methods = ["plain", "cwd", "logit"]
    firsts = [rotated(methods, r)[0] for r in range(3)]
    assert sorted(firsts) == sorted(methods)
    assert all(sorted(rotated(methods, r)) == sorted(methods) for r in range(5))


def test_ratios_pair_each_round_with_its_own_plain_time() -> None:
    times = {PLAIN: [10.0, 20.0, 10.0], "cwd": [12.0, 24.0, 30.0]}
    assert ratios(times) == {PLAIN: 1.0, "cwd": pytest.approx(1.2)}  # the slow third round is outvoted


@pytest.mark.e2e
def test_a_real_run_tabulates_plain_and_the_loss(tiny_repo: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    root = tiny_repo[0]
    out = tmp_path / "overhead.md"
    main(["--params", str(root / "params.yaml"), "--data", str(root / "data/prepared"),
          "--teacher", str(root / "models/teacher.pt"), "--losses", "logit", "--rounds", "1", "--out", str(out)])
    rows = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")}
    assert set(rows) == {"method", PLAIN, "logit"}
    assert "| 1.00x |" in rows[PLAIN]
    seconds, ratio = re.findall(r"\| ([\d.]+) \| ([\d.]+)x \|", rows["logit"])[0]
    # a ratio, not a timing bound: its size depends on what else runs on the machine
    assert float(seconds) > 0 and 0 < float(ratio) < float("inf")
