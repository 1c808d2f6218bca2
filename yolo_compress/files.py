"""Atomic file writes: a reader (or a killed stage) never sees a half-written output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from yolo_compress.errors import UserError, raise_if_interrupted


def _replace_from_temp(dst: Path, write: Any) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(dst)) from err  # name the output, not a temp file's name
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private to the user; an output should read like any other file
        raise_if_interrupted()
        os.replace(tmp, dst)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(dst)) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_outputs(outputs: Iterable[str | Path], room_bytes: int = 0) -> None:
    """Before a stage does any work: each output can be created and renamed into place (as the atomic writes here
    do), and its disk has `room_bytes` free. UserError naming the path otherwise, so a read-only or immutable folder
    or a full disk costs seconds, not a training run."""
    for out in map(Path, outputs):
        folder = out.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
            os.close(fd)
            try:
                os.replace(probe, f"{probe}.renamed")
            finally:
                Path(probe).unlink(missing_ok=True)
                Path(f"{probe}.renamed").unlink(missing_ok=True)
            if out.exists():  # an immutable file or folder cannot be replaced; renaming it there and back shows that
                aside = out.with_name(f".{out.name}.probe-aside")
                os.rename(out, aside)
                os.rename(aside, out)
        except OSError as err:
            raise UserError(f"{out}: this output cannot be written ({err.strerror}: {err.filename}); make {folder} a "
                            "writable folder (chmod u+w, or chattr -i if it was made immutable) and rerun") from None
        free = shutil.disk_usage(folder).free
        if free < room_bytes:
            raise UserError(f"{folder}: {free / 1e6:.0f} MB free on its disk, and this stage needs about "
                            f"{room_bytes / 1e6:.0f} MB for its checkpoints; free some space and rerun")


@contextlib.contextmanager
def weights_kept(weights: Path) -> Iterator[None]:
    """Writing a stage's outputs after training: a write that fails anyway becomes one line naming the cause and
    where the finished weights are, which a rerun with `resume: true` writes out without training again."""
    try:
        yield
    except OSError as err:
        where = err.filename or "an output"
        raise UserError(f"{where}: could not write it ({err.strerror}); the trained weights are kept in {weights}: "
                        "fix that and rerun with `resume: true` in params.yaml to write the outputs without "
                        "training again") from None


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    _replace_from_temp(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically."""
    _replace_from_temp(Path(path), lambda tmp: tmp.write_text(text))


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy a file atomically."""
    _replace_from_temp(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def size_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder (an OpenVINO IR folder is one shipped file)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


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
