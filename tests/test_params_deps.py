"""dvc.yaml's params lists against what the stages really read, and params.yaml's keys against config.py."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml

from yolo_compress.config import Params, load_params
from yolo_compress.errors import ParamsError

from .tiny_pipeline import REPO, STAGES, reads_file

# Read by stages but deliberately not DVC params: they change how a stage runs, not what it produces.
NOT_OUTPUT_PARAMS = {"resume", "trust_checkpoints"}
# Read by a stage only to check them early (prepare checks every device exists), never to make its outputs.
CHECKED_EARLY = {"prepare": {"teacher.device", "student.device", "benchmark.device"}}
# Listed though a default run does not read it: prune reads distill.* only with prune.distill: true.
CONDITIONAL = {("prune", "distill")}


def sections() -> list[tuple[str, type]]:
    hints = typing.get_type_hints(Params)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(Params) if dataclasses.is_dataclass(hints[f.name])]


def listed_params() -> dict[str, set[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: set(spec.get("params", [])) for name, spec in stages.items()}


def covered(key: str, listed: set[str]) -> bool:
    return key in listed or key.split(".")[0] in listed


@pytest.mark.e2e
def test_every_param_a_stage_reads_is_a_dvc_param_of_that_stage(tiny_repo: tuple[Path, dict[str, str]]) -> None:
    """Derived from a real run: each stage of the tiny pipeline recorded the params keys it read."""
    reads: dict[str, set[str]] = {}
    for line in reads_file(tiny_repo[0]).read_text().splitlines():
        record = json.loads(line)
        reads.setdefault(record["stage"], set()).update(record["reads"])
    assert set(reads) >= STAGES - {"report"}, sorted(reads)  # report reads metrics files only
    listed = listed_params()
    for stage, keys in reads.items():
        unlisted = keys - NOT_OUTPUT_PARAMS - CHECKED_EARLY.get(stage, set())
        missing = sorted(k for k in unlisted if not covered(k, listed[stage]))
        assert not missing, f"{stage} reads {missing}, which dvc.yaml does not list for it"
        unread = sorted(e for e in listed[stage] if (stage, e) not in CONDITIONAL
                        and not any(k == e or k.startswith(f"{e}.") for k in keys))
        assert not unread, f"dvc.yaml lists {unread} for {stage}, which it does not read"


def test_whole_sections_for_the_stages_that_own_them() -> None:
    """A typo in a section (`student.epoch`) must rerun, and so stop, the stages that read the section."""
    listed = listed_params()
    for stage, section in (("prepare", "data"), ("train_teacher", "teacher"), ("train_student", "student"),
                           ("distill", "student"), ("distill", "distill"), ("prune", "prune"),
                           ("export", "export"), ("evaluate", "evaluate"), ("benchmark", "benchmark"),
                           ("report", "report")):
        assert section in listed[stage], (stage, section)


@pytest.mark.parametrize(("section", "cls"), sections())
def test_every_key_of_every_section_is_typed_and_rejects_a_wrong_type(section: str, cls: type,
                                                                     tmp_path: Path) -> None:
    hints = typing.get_type_hints(cls)
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for f in dataclasses.fields(cls):
        assert f.name in hints and hints[f.name] is not typing.Any, f"{section}.{f.name} has no type"
        bad = {**base, section: {**base[section], f.name: {"not": "a value"}}}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ParamsError, match=rf"{section}\.{f.name}: expected "):
            load_params(tmp_path / "params.yaml")


def test_params_yaml_sets_every_key_explicitly() -> None:
    """Defaults live in config.py, but the reviewed values live in params.yaml (and `dvc exp run -S` needs them)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, cls in sections():
        assert set(raw[section]) == {f.name for f in dataclasses.fields(cls)}, section
    top = {f.name for f in dataclasses.fields(Params)} - {s for s, _ in sections()}
    assert top <= set(raw), sorted(top - set(raw))
