"""One structured pruning step of an Ultralytics YOLO model with torch-pruning: importance -> pruner -> step.

`build_importance` names the criterion, `prune_round` prunes one round's share of FLOPs or parameters in place
(searching the channel ratio that removes it). The rounds around it (schedule, fine-tune, keep) are
`yolo_compress.prune.rounds`. What made torch-pruning 1.6 work on YOLO here (docs/measured-facts.md):

- CSP blocks are rewritten split-free first (`yolo_compress.splitfree`); otherwise `step()` raises IndexError.
- The Detect/Pose head and the `Attention` modules inside C2PSA are protected (ignored layers); tracing through
  attention hung or ran out of memory.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from ultralytics.nn.modules.conv import Conv
from ultralytics.nn.modules.head import Detect

from yolo_compress.config import PRUNE_HEAD_MODES as HEAD_MODES
from yolo_compress.errors import ModelError, ParamsError
from yolo_compress.models import count_params, fixed_blocks, unwrap_yolo
from yolo_compress.splitfree import check_prunable, make_split_free

__all__ = ["HEAD_MODES", "IMPORTANCES", "MEASURES", "PruneConfigError", "build_importance",
           "protected_layers", "prune_round"]

LOG = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "bn", "taylor", "random")
MEASURES = ("flops", "params", "channels")  # what a round's ratio removes; flops are counted as MACs
MAX_CHANNEL_RATIO = 0.95  # never remove more channels than this in one round: a layer left with 1 channel is dead


class PruneConfigError(ParamsError, ValueError):
    """A bad pruning setting; a ParamsError (one line, exit 2 in a stage) and a ValueError for library callers."""


# -------------------------------------------------------------------------------------------------------- importance


def build_importance(name: str) -> tp.importance.Importance:
    """torch-pruning importance by name: l1 | l2 (group weight norms), bn (BN |gamma|, network slimming),
    taylor (|w * dL/dw|; call `taylor_backward` on the model before pruning), random (a control)."""
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "bn":
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise PruneConfigError(f"prune.importance: expected one of {', '.join(IMPORTANCES)}, got {name!r}")


# ----------------------------------------------------------------------------------------------------------- pruning


def protected_layers(model: nn.Module, head: str = "inputs") -> list[nn.Module]:
    """Modules torch-pruning must not prune: every Attention/AAttn block, and the Detect/Pose head as `head` says.

    - "none": the whole head is protected.
    - "inputs": the head's depthwise input convs (YOLO11/26 `cv3[i][0]`) are free. A depthwise conv must follow the
      width of its input, so freezing it would also freeze the neck outputs P3-P5 that feed the head.
    - "hidden": every Conv block of the head is free, so the hidden widths of the box, class (and keypoint) branches
      shrink too. The branches' final plain Conv2d layers and the DFL stay protected: their outputs are the
      predictions, and torch-pruning may still cut their inputs.
    """
    if head not in HEAD_MODES:
        raise PruneConfigError(f"prune.head: expected one of {', '.join(HEAD_MODES)}, got {head!r}")
    out: list[nn.Module] = []
    for m in fixed_blocks(model):
        if not isinstance(m, Detect) or head == "none":
            out.append(m)
        else:
            free: set[nn.Module] = set()
            for c in m.modules():
                if isinstance(c, Conv) and (head == "hidden" or c.conv.groups == c.conv.in_channels > 1):
                    free.update(x for x in (c.conv, getattr(c, "bn", None)) if x is not None)
            out.extend(x for x in m.modules() if not any(True for _ in x.children()) and x not in free)
    return out


def _forward(model: nn.Module, x: torch.Tensor) -> Any:
    return model(x)


def _copy_with_grads(model: nn.Module) -> nn.Module:
    """deepcopy that keeps `.grad` (deepcopy drops it, and taylor importance reads it)."""
    new = copy.deepcopy(model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, p in new.named_parameters():
        if n in grads:
            p.grad = grads[n].clone()
    return new


class _NearestRoundPruner(tp.pruner.BasePruner):
    """BasePruner whose `round_to` keeps the multiple nearest to the asked width, never fewer than `round_to`."""

    # Private override, no public hook: torch-pruning 1.6 floors the kept width (its docs say "nearest"), so any
    # ratio > 0 cut a 16-channel stem conv to 8, and the freshly pruned model scored ~0 before its fine-tune.
    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = round((current_channels - n_pruned) / round_to) * round_to
        return max(current_channels - max(kept, min(round_to, current_channels)), 0)


def _prune_channels(
    model: nn.Module, x: torch.Tensor, ratio: float, importance: tp.importance.Importance, round_to: int | None,
    global_pruning: bool, head: str, protect: list[str],
) -> None:
    """One torch-pruning step at channel ratio `ratio`, in place; training flag and requires_grad are restored."""
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.enable_grad():  # tracing follows grad_fn: it sees nothing under no_grad or with frozen weights
        for p in model.parameters():
            p.requires_grad_(True)
        pruner = _NearestRoundPruner(
            model,
            x,
            importance=importance,
            pruning_ratio=ratio,
            ignored_layers=protected_layers(model, head) + [model.get_submodule(n) for n in protect],
            round_to=round_to,
            global_pruning=global_pruning,
            forward_fn=_forward,  # traced in eval mode (torch-pruning sets it): BN statistics stay untouched
        )
        pruner.step()
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True))
    model.train(was_training)


def _macs_params(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    macs, _ = tp.utils.count_ops_and_params(model, x)  # runs on a deepcopy in eval mode
    return int(macs), count_params(model)


def _search_channel_ratio(
    model: nn.Module, prune: Callable[[nn.Module, float], None], x: torch.Tensor, goal: float, target: str,
    tol: float, max_trials: int,
) -> tuple[float, int]:
    """Channel ratio whose pruning keeps `goal` of the target measure, and the number of trials.

    Each trial prunes a deep copy. The next guess fits kept = (1 - r) ** p through the last trial, bisecting instead
    when that leaves the bracket. p starts at 1.75: measured MACs gave 1.5 (yolov8n), 1.7 (yolo11n), 2.0 (yolo26n);
    2 would be the rule for convs whose inputs and outputs both shrink, the protected head pulls it down.
    """
    index = 0 if target == "flops" else 1
    base = _macs_params(model, x)[index]
    lo, hi = 0.0, MAX_CHANNEL_RATIO  # channel ratios known to keep too much / too little
    r, p = 1 - goal ** (1 / 1.75), 1.75
    best: tuple[float, float] | None = None
    trials = 0
    while trials < max_trials:
        trials += 1
        trial = _copy_with_grads(model)
        prune(trial, r)
        kept = _macs_params(trial, x)[index] / base
        if best is None or abs(kept - goal) < abs(best[1] - goal):
            best = (r, kept)
        if abs(kept - goal) <= tol:
            break
        if kept > goal:
            lo = r
        else:
            hi = r
        if hi - lo < 0.005:  # round_to makes the measure a step function: no ratio in between does better
            break
        if 0 < kept < 1:
            p = math.log(kept) / math.log(1 - r)
        r = 1 - goal ** (1 / p) if p > 0 else (lo + hi) / 2
        if not lo < r < hi:
            r = (lo + hi) / 2
    return best[0], trials  # type: ignore[index] - max_trials >= 1 sets best


def prune_round(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    importance: str | tp.importance.Importance = "l2",
    round_to: int | None = 8,
    target: str = "flops",
    *,
    global_pruning: bool = False,
    head: str = "inputs",
    tol: float = 0.01,
    max_trials: int = 5,
    protect: Iterable[nn.Module] = (),
) -> dict[str, float]:
    """Prune `model` in place by one round; return params and MACs before/after plus the channel ratio used.

    `ratio` is the fraction to remove this round of `target`: "flops" (MACs counted by torch-pruning at the input's
    size), "params", or "channels" (torch-pruning's channel pruning ratio, used as is). For flops/params the channel
    ratio is searched on deep copies (at most `max_trials`, each ~2-6 s on CPU for yolo11n) until the kept fraction
    is within `tol`: no closed form fits, since the protected head keeps its widths. Measured on yolo11n at 256 px,
    channel ratio 0.5 keeps 41% of MACs (50% with `head="none"`), not the 25% of the (1 - r)^2 rule.

    Attention and the head's outputs are always protected (`protected_layers`, `head` says how much of the head may
    shrink); `protect` adds modules of `model` to that.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise PruneConfigError(f"prune ratio: expected a float in (0, 1) (share to remove this round), got {ratio!r}")
    if target not in MEASURES:
        raise PruneConfigError(f"prune target: expected one of {', '.join(MEASURES)}, got {target!r}")
    if head not in HEAD_MODES:
        raise PruneConfigError(f"prune.head: expected one of {', '.join(HEAD_MODES)}, got {head!r}")
    if max_trials < 1:
        raise PruneConfigError(f"max_trials: expected an int >= 1, got {max_trials!r}")
    imp = build_importance(importance) if isinstance(importance, str) else importance
    model = unwrap_yolo(model)
    check_prunable(make_split_free(model), "prune_round: the model")
    if isinstance(imp, tp.importance.GroupTaylorImportance) and any(
        m.weight.grad is None for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad
    ):
        raise ModelError("prune.importance=taylor needs gradients: run taylor_backward(model, batches) right before "
                         "prune_round")
    names = {id(m): n for n, m in model.named_modules()}
    if any(id(m) not in names for m in protect):
        raise ModelError("protect: every protected module must be a submodule of the model being pruned")
    protect_names = [names[id(m)] for m in protect]  # by name: the search prunes deep copies
    p0 = next(model.parameters())
    x = example_input.to(device=p0.device, dtype=p0.dtype)
    macs0, params0 = _macs_params(model, x)

    def prune(m: nn.Module, r: float) -> None:  # one pruning pass at channel ratio r
        _prune_channels(m, x, r, imp, round_to, global_pruning, head, protect_names)

    trials, channel_ratio = 0, ratio
    if target != "channels":
        channel_ratio, trials = _search_channel_ratio(model, prune, x, 1 - ratio, target, tol, max_trials)
    # The search pruned copies; the model itself gets the chosen ratio once more (the same channels: the importance
    # criteria are deterministic, except `random`).
    prune(model, channel_ratio)
    model.zero_grad(set_to_none=True)  # gradients of the old widths mean nothing now
    macs1, params1 = _macs_params(model, x)
    achieved = 1 - (macs1 / macs0 if target == "flops" else params1 / params0)
    if target != "channels" and abs(achieved - ratio) > tol:
        LOG.warning("pruning removed %.3f of %s instead of %.3f (round_to=%s limits the granularity)", achieved,
                    target, ratio, round_to)
    return {
        "params_before": params0,
        "params_after": params1,
        "macs_before": macs0,
        "macs_after": macs1,
        "channel_ratio": float(channel_ratio),
        "removed": float(achieved),
        "trials": trials,
    }
