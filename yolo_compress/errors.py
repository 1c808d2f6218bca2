"""User-facing errors: each becomes one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input the user can fix; the message names the file, key or value and the fix."""


class ParamsError(UserError):
    """A bad key, type or value in params.yaml."""


class DatasetError(UserError):
    """A missing, empty or malformed dataset (labels are reported as file:line)."""


class ModelError(UserError):
    """A missing model file, or models that do not fit together."""


def stage_entrypoint(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a stage's main(): a UserError prints `error: ...` and exits 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}{_queued_hint(str(err))}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def _queued_hint(message: str) -> str:
    # `dvc exp run --queue/--temp` runs in a copy that holds only what git or DVC tracks: a file that exists in the
    # workspace but was never added is "not found" there, which is baffling without this.
    if "not found" in message and f"{Path('.dvc', 'tmp', 'exps')}" in str(Path.cwd()):
        return ("; this is a queued DVC experiment, which sees only files tracked by git or DVC: "
                "`git add` (or `dvc add`) the file, commit, and queue again")
    return ""
