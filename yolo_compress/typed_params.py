"""Building a typed dataclass from a YAML mapping: unknown keys, wrong types and missing keys each raise one
`ParamsError` naming the key; and the read tracer that proves dvc.yaml's params lists (tests/test_params_deps.py)."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from yolo_compress.errors import ParamsError

__all__ = ["READS_ENV", "Section", "build_checked", "check", "trace_reads"]


def check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ParamsError(f"{key}: expected {expected}, got {value!r}")


# YOLO_COMPRESS_PARAMS_READS=<file>: each process appends the params keys it read, one JSON line per process
# ({"stage": $DVC_STAGE, "reads": [...]}); tests/test_params_deps.py compares them with the params dvc.yaml lists.
READS_ENV = "YOLO_COMPRESS_PARAMS_READS"
_reads: set[str] | None = None


class Section:
    """Base of the params dataclasses: records `section.key` reads while READS_ENV is set (no cost otherwise)."""

    def __getattribute__(self, name: str) -> Any:
        if _reads is not None and not name.startswith("_") and name in type(self).__dataclass_fields__:
            section = object.__getattribute__(self, "__dict__").get("_section")  # None: a copy (dataclasses.replace)
            if section is not None and not isinstance(object.__getattribute__(self, name), Section):
                _reads.add(f"{section}.{name}" if section else name)
        return object.__getattribute__(self, name)


def trace_reads() -> None:
    global _reads
    if _reads is not None or not os.environ.get(READS_ENV):
        return
    _reads = set()
    out = Path(os.environ[READS_ENV])

    def dump() -> None:
        with out.open("a") as f:  # one short line per process: appends do not interleave
            f.write(json.dumps({"stage": os.environ.get("DVC_STAGE", ""), "reads": sorted(_reads)}) + "\n")

    atexit.register(dump)


def _is_number_text(value: Any) -> bool:
    # YAML 1.1 reads `1e-3` (no dot) as a string; users mean a float.
    try:
        return isinstance(value, str) and float(value) == float(value)
    except ValueError:
        return False


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _is_number_text(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return isinstance(value, tp)


def build_checked(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, checking keys and types; `prefix` names the section."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"unknown key '{prefix}{unknown[0]}'; valid keys in {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_checked(tp, value, f"{prefix}{name}.")
            continue
        if not _type_ok(value, tp):
            tname = getattr(tp, "__name__", str(tp))
            raise ParamsError(f"{prefix}{name}: expected {tname}, got {value!r} ({type(value).__name__})")
        kwargs[name] = float(value) if tp is float else value
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ParamsError(f"missing key '{prefix}{missing[0]}'")
    try:
        built = cls(**kwargs)
        for name, value in [("", built), *((f"{prefix}{n}", getattr(built, n)) for n in fields)]:
            if isinstance(value, Section) and "_section" not in value.__dict__:  # sections left at their defaults
                object.__setattr__(value, "_section", name or prefix.rstrip("."))
        return built
    except ParamsError as err:
        msg = str(err)
        # Section validators name their own keys; prepend the section so the key is complete.
        raise ParamsError(msg if msg.startswith(prefix) or not prefix else f"{prefix}{msg}") from None
