"""User-facing errors: each becomes one line on stderr and exit code 2, never a traceback.

An interruption becomes one line too, exit code 130 (Ctrl-C) or 143 (SIGTERM). Kept free of heavy imports: a training
stage registers what to say about resuming with `set_resume_hint`.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C."""


EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: what a shell reports for a Ctrl-C'd command
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

# () -> epoch a rerun with `resume: true` would continue from, or None when nothing is resumable. Set by the
# training code while it trains; read only when the stage is interrupted.
_resume_hint: Callable[[], int | None] | None = None


def set_resume_hint(hint: Callable[[], int | None] | None) -> None:
    """Register (None: clear) how an interrupted stage finds the epoch a resumed rerun would continue from."""
    global _resume_hint
    _resume_hint = hint


def interrupted_message(stage: str, resume_from: int | None) -> str:
    """The one line an interrupted stage prints."""
    rerun = (f"rerun with resume: true to continue from epoch {resume_from}" if resume_from
             else "rerun to start it again")
    return f"interrupted; outputs of {stage} were not written; {rerun}"


def stage_name() -> str:
    """The DVC stage being run (DVC sets DVC_STAGE), else the script's name."""
    return os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem


# The interrupting signal once one has arrived. Python drops an exception raised while it runs a weakref callback,
# a __del__ or the garbage collector ("Exception ignored in ..."), so a signal landing there would be lost and the
# stage would go on to write its outputs: raise_if_interrupted() raises it again where outputs are committed.
_pending: int | None = None


def _interruption(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def interrupt_handler(owner: int) -> Callable[[int, Any], None]:
    """SIGINT/SIGTERM handler for process `owner`: record the signal, then raise it as KeyboardInterrupt/Terminated."""
    def handler(signum: int, frame: Any) -> None:
        global _pending
        if os.getpid() != owner:  # a forked data-loader worker inherited this handler: behave as if it had not
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # what Python's own handler, which it replaced, does
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _pending = signum
        raise _interruption(signum)

    return handler


def raise_if_interrupted() -> None:
    """Raise the interruption again if a signal arrived and its first exception was swallowed."""
    if _pending is not None:
        raise _interruption(_pending)


def resume_from() -> int | None:
    """The epoch a resumed rerun would continue from (via the registered hint), else None."""
    if _resume_hint is None:
        return None
    try:
        return _resume_hint()
    except Exception:  # noqa: BLE001 - a failing hint must not replace the interruption line with a traceback
        return None


def _say_interrupted() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(interrupted_message(stage_name(), resume_from()), file=sys.stderr, flush=True)


def stage_entrypoint(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a stage's main(): a UserError, or an OSError about a file (a folder turned read-only, a full disk),
    prints `error: ...` and exits 2; Ctrl-C or SIGTERM prints one `interrupted; ...` line and exits 130 (Ctrl-C) or
    143 (SIGTERM), as a shell reports those signals."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # SIGTERM (a job scheduler, `kill`, a lost terminal) unwinds like Ctrl-C: context managers close the MLflow
        # run and atomic writes drop their temp files, instead of the process dying mid-way.
        global _pending
        _pending = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, interrupt_handler(os.getpid()))
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}{_queued_hint(str(err))}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:
            if not err.filename:  # not about a file the user can fix
                raise
            print(f"error: {err.filename}: {err.strerror}; fix its folder (permissions, space) and rerun",
                  file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as err:
            _say_interrupted()
            raise SystemExit(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED) from None

    return wrapper


def _queued_hint(message: str) -> str:
    # `dvc exp run --queue/--temp` runs in a copy that holds only what git or DVC tracks: a file that exists in the
    # workspace but was never added is "not found" there, which is baffling without this.
    if "not found" in message and f"{Path('.dvc', 'tmp', 'exps')}" in str(Path.cwd()):
        return ("; this is a queued DVC experiment, which sees only files tracked by git or DVC: "
                "`git add` (or `dvc add`) the file, commit, and queue again")
    return ""
