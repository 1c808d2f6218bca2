"""Atomic file writes: a reader (or a killed stage) never sees a half-written output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from yolo_compress.errors import UserError, raise_if_interrupted


def _replace_from_temp(dst: Path, write: Any) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private to the user; an output should read like any other file
        raise_if_interrupted()
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    _replace_from_temp(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    _replace_from_temp(Path(path), lambda tmp: tmp.write_text(text))


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy a file atomically."""
    _replace_from_temp(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or broken file is a UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run the stage that writes it first (dvc repro)") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); delete it and rerun its stage") from None


def write_with(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Write a file atomically with `write(tmp_path)` (e.g. a savefig that cannot stream to a file object)."""
    _replace_from_temp(Path(path), write)


@contextlib.contextmanager
def atomic_dir(dst: str | Path) -> Iterator[Path]:
    """Build a whole output folder in a temp sibling, then swap it in for `dst`.

    A failure inside the block leaves the old `dst` (or none) untouched, so a reader never sees a half set of files.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        raise_if_interrupted()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)  # mkdtemp makes it private to the user; an output folder should read like any other
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)  # a directory cannot be replaced in one rename: move the old one aside first
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
