"""Are the committed results (dvc.lock, metrics/) the results of the committed params and code?

    python -m yolo_compress.review.freshness      # what CI runs: exit 1 with one line when results are stale

- Fails when `params.yaml` (or a stage's command, deps or params list in `dvc.yaml`) no longer matches what
  `dvc.lock` recorded: those stages' committed numbers are not what `dvc repro` would produce now.
- Fails when a committed metrics file lacks a key that the report reads.
- Prints, without failing, the stages whose code (git-tracked deps such as `stages/*.py`, `yolo_compress/*.py`)
  changed since their results were made: their numbers may move, or may not (a refactor).

It reads dvc.yaml, dvc.lock and params.yaml as files and hashes code like DVC does (md5 of the bytes), so it runs in
a fresh clone without DVC's cache, the data or the models.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from yolo_compress.errors import UserError
from yolo_compress.ship.report_inputs import missing_report_keys

PARAMS_FILE = "params.yaml"
RERUN = "run `dvc repro` and commit dvc.lock, metrics/, plots/ and reports/ with the change"


@dataclass
class Freshness:
    """What differs between the committed results and the workspace."""

    stale: dict[str, list[str]] = field(default_factory=dict)  # stage -> what differs (params, cmd, deps list)
    code_changed: dict[str, list[str]] = field(default_factory=dict)  # stage -> code files changed since its run
    missing_keys: list[str] = field(default_factory=list)  # "metrics/x.json: a.b" the report reads but lacks


def _read_yaml(path: Path) -> Any:
    # YAML 1.2 as DVC reads it (ruamel): dvc.lock writes 2e-05, which PyYAML's YAML 1.1 would read as a string
    try:
        return YAML(typ="safe", pure=True).load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None


def dotted(tree: Any, key: str) -> Any:
    """`tree['a']['b']` for key 'a.b'; KeyError when a part is missing."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(key)
        tree = tree[part]
    return tree


def interpolate(text: str, params: dict[str, Any]) -> str:
    """DVC's `${a.b}` templating against params.yaml, for comparing commands and paths with dvc.lock."""
    return re.sub(r"\$\{\s*([\w.]+)\s*\}", lambda m: str(dotted(params, m.group(1))), text)


def _names(entries: list[Any]) -> list[str]:
    # dvc.yaml lists entries as plain strings or one-key mappings (`- metrics/x.json: {cache: false}`)
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def _param_keys(entries: list[Any]) -> dict[str, list[str]]:
    """dvc.yaml `params:` of a stage -> {file: [keys]}; bare keys belong to params.yaml."""
    out: dict[str, list[str]] = {}
    for e in entries or []:
        if isinstance(e, str):
            out.setdefault(PARAMS_FILE, []).append(e)
        else:
            for file, keys in e.items():
                out.setdefault(file, []).extend(keys or [])
    return out


def _md5(path: Path) -> str | None:
    try:
        return hashlib.md5(path.read_bytes()).hexdigest()
    except (FileNotFoundError, IsADirectoryError):
        return None


def _fmt(value: Any) -> str:
    if value is _ABSENT:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def changes(key: str, old: Any, new: Any) -> list[str]:
    """`key: old -> new` for each leaf that differs; a whole section is compared key by key (a typo shows as new)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in [*old, *(k for k in new if k not in old)]
                for c in changes(f"{key}.{k}", old.get(k, _ABSENT), new.get(k, _ABSENT))]
    if old == new:
        return []
    return [f"{key}: {_fmt(old)} -> {_fmt(new)}"]


_ABSENT = "(absent)"


def check(root: str | Path = ".") -> Freshness:
    """Compare dvc.yaml + params.yaml + code with dvc.lock and the committed metrics, in `root`."""
    root = Path(root)
    pipeline = _read_yaml(root / "dvc.yaml").get("stages", {})
    if not (root / "dvc.lock").is_file():
        raise UserError(f"{root / 'dvc.lock'}: not found, so no results are committed; {RERUN}")
    lock = _read_yaml(root / "dvc.lock").get("stages", {})
    params = {PARAMS_FILE: _read_yaml(root / PARAMS_FILE)}
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True).stdout.split())
    result = Freshness()
    for stage, spec in pipeline.items():
        if stage not in lock:
            result.stale[stage] = ["never run"]
            continue
        locked, why = lock[stage], []
        if interpolate(" ".join(str(spec.get("cmd", "")).split()), params[PARAMS_FILE]) != " ".join(
                str(locked.get("cmd", "")).split()):
            why.append("command changed")
        deps = {interpolate(d, params[PARAMS_FILE]) for d in _names(spec.get("deps"))}
        if deps != {d["path"] for d in locked.get("deps", [])}:
            why.append("deps list changed")
        recorded = locked.get("params", {})
        for file, keys in _param_keys(spec.get("params")).items():
            current = params.setdefault(file, _read_yaml(root / file))
            for key in keys:
                if key not in recorded.get(file, {}):
                    why.append(f"{key} newly listed")
                    continue
                try:
                    now = dotted(current, key)
                except KeyError:
                    now = None
                why += changes(key, recorded[file][key], now)
        if why:
            result.stale[stage] = why
        changed = [d["path"] for d in locked.get("deps", []) if d["path"] in tracked and "md5" in d
                   and _md5(root / d["path"]) != d["md5"]]
        if changed:
            result.code_changed[stage] = changed
    result.missing_keys = missing_report_keys(root / "metrics")
    return result


def describe_code_changes(code_changed: dict[str, list[str]]) -> str:
    """One line: the stages whose code changed since their results were made."""
    if not code_changed:
        return "no stage's code changed since its results were made"
    return "code changed since these results were made (numbers may be out of date): " + "; ".join(
        f"{stage} ({', '.join(paths)})" for stage, paths in code_changed.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the repo (default: current folder)")
    args = ap.parse_args(argv)
    try:
        found = check(args.root)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(describe_code_changes(found.code_changed))
    if found.stale:
        stages = "; ".join(f"{s} ({', '.join(why)})" for s, why in found.stale.items())
        print(f"error: committed results are stale for stages {stages}; {RERUN}", file=sys.stderr)
        return 1
    if found.missing_keys:
        print(f"error: committed metrics lack keys the report reads: {', '.join(found.missing_keys)}; {RERUN}",
              file=sys.stderr)
        return 1
    print("results are fresh: params.yaml and dvc.yaml match dvc.lock, metrics have every key the report reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
