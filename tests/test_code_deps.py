"""dvc.yaml's code deps against the project modules each stage script imports, directly or through other modules.

DVC reruns a stage only when a declared dep changes, so a module missing here would leave `dvc status` clean and the
committed results stale; a module listed but not imported would rerun a stage for nothing. Two kinds of module are
left out on purpose: the MLflow tracking package (logging only: a logging fix must not rerun training) and the
subpackage entries, which hold only a docstring (tests/test_architecture.py checks that).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.import_graph import PACKAGE, ROOT, closure, module_file

LOGGING_ONLY = f"{PACKAGE}.tracking"


def _not_a_dep(name: str) -> bool:
    return name == LOGGING_ONLY or name.startswith(LOGGING_ONLY + ".")


def needed_code(script: Path) -> set[str]:
    """The repo paths of the stage script and of every project module it needs, minus the two kinds left out."""
    paths = {script.relative_to(ROOT).as_posix()}
    for name in closure(script, skip=_not_a_dep):
        path = module_file(name)
        if path.name != "__init__.py" or name == PACKAGE:
            paths.add(path.relative_to(ROOT).as_posix())
    return paths


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_code_deps_are_exactly_the_modules_the_script_imports(stage: str) -> None:
    spec = stages()[stage]
    script = ROOT / re.search(r"python (stages/\w+\.py)", spec["cmd"]).group(1)
    listed = {d for d in spec["deps"] if d.startswith((f"{PACKAGE}/", "stages/"))}
    needed = needed_code(script)
    assert not needed - listed, f"{stage}: dvc.yaml misses deps {sorted(needed - listed)}"
    assert not listed - needed, f"{stage}: dvc.yaml lists deps its script never imports {sorted(listed - needed)}"


def test_the_rule_sees_late_imports_and_stops_at_tracking(tmp_path: Path) -> None:
    # a stage-like script: one import inside a function, one of the tracking package
    script = ROOT / "stages" / "_probe_code_deps.py"
    script.write_text("from yolo_compress.tracking.runs import stage_run\n\n\ndef main():\n"
                      "    from yolo_compress.prune.rounds import pick_round\n")
    try:
        needed = needed_code(script)
    finally:
        script.unlink()
    assert f"{PACKAGE}/prune/rounds.py" in needed and f"{PACKAGE}/train/trainer.py" in needed  # through rounds
    assert not any(p.startswith(f"{PACKAGE}/tracking/") for p in needed)
    assert f"{PACKAGE}/prune/__init__.py" not in needed and f"{PACKAGE}/__init__.py" in needed
