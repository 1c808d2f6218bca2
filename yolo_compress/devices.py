"""Whether the devices params.yaml names exist on this machine: one line naming the key, before any data loads."""

from __future__ import annotations

import os

from yolo_compress.errors import ParamsError

__all__ = ["all_cores", "check_device", "device_problem", "use_all_cores"]


def all_cores() -> int:
    """The cores this process may run on (its affinity mask: a pinned test worker gets 1)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_all_cores() -> None:
    """Give torch one thread per core this process may use.

    Without this the count depends on import order: Ultralytics sets OMP_NUM_THREADS=1 at its import, so a process
    that imports it before torch runs torch on 1 thread, and float results differ with the thread count.
    """
    import torch  # late, for the same reason

    torch.set_num_threads(all_cores())


def device_problem(device: str | int, key: str, cuda_count: int, mps: bool = False) -> str | None:
    """Why `device` (params `key`) cannot run on a machine with `cuda_count` CUDA devices (and MPS or not), else None.

    The syntax is checked by config; this checks the devices exist, before any data loads (Ultralytics would fail
    only after loading the data, with a 30-line traceback).
    """
    text = str(device).replace(" ", "").lower()
    if text == "cpu":
        return None
    if text == "mps":
        return None if mps else f"{key}: {device!r} asks for MPS, which this machine does not have; use {key}: cpu"
    asked = [int(i) for i in text.split(",") if i]
    missing = [i for i in asked if i >= cuda_count]
    if not missing:
        return None
    has = (f"{cuda_count} CUDA device{'s' if cuda_count > 1 else ''}: {', '.join(map(str, range(cuda_count)))}"
           if cuda_count else "no CUDA device")
    fix = f"use {key}: cpu" + (f" or one of {', '.join(map(str, range(cuda_count)))}" if cuda_count else "")
    return f"{key}: {device!r} asks for CUDA device {', '.join(map(str, missing))}, but this machine has {has}; {fix}"


def check_device(device: str | int, key: str) -> None:
    """ParamsError (one line: key, value, what this machine has, the fix) when `device` does not exist here."""
    import torch  # late: a stage that imports torch before Ultralytics gets another thread count

    problem = device_problem(device, key, torch.cuda.device_count(), torch.backends.mps.is_available())
    if problem:
        raise ParamsError(problem)
