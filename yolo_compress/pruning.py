"""Structured channel pruning of Ultralytics YOLO models with torch-pruning, and fine-tuning that keeps the widths.

Torch-Pruning style, in composable pieces: `build_importance` -> `prune_round` (pruner + step) -> `finetune`, with
the per-round amounts from the pure `prune_schedule`. What made torch-pruning 1.6 work on YOLO here (NOTES.md):

- CSP blocks are rewritten split-free first (`yolo_compress.splitfree`); otherwise `step()` raises IndexError.
- The Detect/Pose head and the `Attention` modules inside C2PSA are protected (ignored layers); tracing through
  attention hung or ran out of memory.
- Fine-tuning goes through a trainer whose `get_model` returns the pruned module: the stock trainer rebuilds the
  model from its (now stale) `model.yaml` and silently trains a full-width network.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics.cfg import get_cfg
from ultralytics.engine.model import Model
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.pose import PoseTrainer
from ultralytics.nn.modules.block import AAttn, Attention
from ultralytics.nn.modules.conv import Conv
from ultralytics.nn.modules.head import Detect
from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

from yolo_compress.config import DistillConfig
from yolo_compress.distill import ADAPTERS, DistillDetectionTrainer, DistillPoseTrainer, build_adapters, check_pair
from yolo_compress.errors import ModelError, ParamsError
from yolo_compress.models import YOLO, count_params
from yolo_compress.splitfree import make_split_free, unsupported_blocks

__all__ = [
    "IMPORTANCES",
    "MEASURES",
    "SCHEDULES",
    "PruneConfigError",
    "PrunedDetectionTrainer",
    "PrunedDistillDetectionTrainer",
    "PrunedDistillPoseTrainer",
    "PrunedPoseTrainer",
    "add_bn_l1_grad",
    "build_importance",
    "calibration_batches",
    "recalibrate_bn",
    "finetune",
    "make_split_free",
    "pick_round",
    "protected_layers",
    "prune_round",
    "prune_schedule",
    "prune_finetune_round",
    "save_pruned",
    "taylor_backward",
]

LOG = logging.getLogger(__name__)

IMPORTANCES = ("l1", "l2", "bn", "taylor", "random")
SCHEDULES = ("geometric", "linear")
MEASURES = ("flops", "params", "channels")  # what a round's ratio removes; flops are counted as MACs
MAX_CHANNEL_RATIO = 0.95  # never remove more channels than this in one round: a layer left with 1 channel is dead

# Written into the checkpoint's model.yaml: the yaml still describes the unpruned widths and must not be rebuilt.
PRUNED_YAML_KEY = "pruned"
PRUNED_YAML_NOTE = ("channel widths differ from this yaml: load the pickled module (YOLO(path)) and fine-tune with "
                    "yolo_compress.pruning.finetune; a stock trainer would rebuild the unpruned model from this yaml")


class PruneConfigError(ParamsError, ValueError):
    """A bad pruning setting; a ParamsError (one line, exit 2 in a stage) and a ValueError for library callers."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The torch module inside an Ultralytics `YOLO` wrapper, or `model` itself."""
    return model.model if isinstance(model, Model) else model


# ---------------------------------------------------------------------------------------------------------- schedule


def prune_schedule(target: float, rounds: int, kind: str = "geometric") -> list[float]:
    """Per-round fraction to remove *of what remains*, so that after all rounds `1 - target` is kept.

    geometric: the same keep ratio every round, (1 - target) ** (1 / rounds).
    linear: the cumulative removed fraction grows linearly, target * i / rounds after round i (later rounds then
    remove a larger share of what is left).
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < 1:
        raise PruneConfigError(f"prune.target: expected a float in (0, 1) (fraction to remove), got {target!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PruneConfigError(f"prune.rounds: expected an int >= 1, got {rounds!r}")
    if kind == "geometric":
        return [1 - (1 - target) ** (1 / rounds)] * rounds
    if kind == "linear":
        kept = [1 - target * i / rounds for i in range(rounds + 1)]
        return [1 - kept[i + 1] / kept[i] for i in range(rounds)]
    raise PruneConfigError(f"prune.schedule: expected one of {', '.join(SCHEDULES)}, got {kind!r}")


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


def _default_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Ultralytics' own training loss (summed over its items) for a preprocessed batch."""
    args = getattr(model, "args", None)
    if not isinstance(args, IterableSimpleNamespace):  # the criterion reads loss gains (box, cls, dfl) as attributes
        model.args = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **(args if isinstance(args, dict) else {})})
    model.criterion = None  # rebuilt from the current head, never a stale one from before a pruning round
    loss, _ = model.loss(batch)
    model.criterion = None  # not picklable into checkpoints, and tied to this batch's device
    return loss.sum()


def taylor_backward(
    model: nn.Module,
    batches: dict[str, Any] | Iterable[dict[str, Any]],
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] | None = None,
) -> float:
    """Accumulate loss gradients over `batches` into the model's `.grad`s, for `taylor` importance; return the loss.

    A batch is an Ultralytics batch dict with `img` already float in [0, 1] (see `calibration_batches`). The model
    runs in eval mode so BatchNorm statistics stay untouched; `loss_fn(model, batch)` replaces Ultralytics' loss.
    """
    model = make_split_free(_unwrap(model))  # before the backward: prune_round would rewrite it (grads are kept)
    loss_fn = loss_fn or _default_loss
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    model.zero_grad(set_to_none=True)
    total = 0.0
    with torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(True)
        for batch in [batches] if isinstance(batches, dict) else batches:
            loss = loss_fn(model, batch)
            loss.backward()
            total += float(loss.detach())
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
    model.train(was_training)
    return total


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
    """Re-estimate every BatchNorm's running mean and variance on `batches`; no weight changes.

    Pruning removes input channels of the conv before each BN, so the stored statistics no longer describe what
    reaches it (adaptive BN, as in EagleEye, Li et al. 2020). Measured on the default distilled model, round 1:
    val mAP50-95 before fine-tune 0.027 with the stale statistics, 0.078 recalibrated on 8 batches.
    """
    model = _unwrap(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the batches, not an exponential one
    was_training = model.training
    model.train()
    for batch in batches:
        model(batch["img"])
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def calibration_batches(data_yaml: Path, imgsz: int, batch: int, n_batches: int, task: str = "detect") -> list[dict]:
    """The first `n_batches` unaugmented batches of the dataset's train split, for `taylor_backward` and
    `recalibrate_bn`."""
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    cfg = get_cfg(overrides={"task": task, "imgsz": imgsz, "data": str(data_yaml), "mode": "val"})
    dataset = build_yolo_dataset(cfg, data["train"], batch, data, mode="val", stride=32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=dataset.collate_fn)
    out = []
    for i, b in enumerate(loader):
        if i >= n_batches:
            break
        b["img"] = b["img"].float() / 255
        out.append(b)
    return out


# ----------------------------------------------------------------------------------------------------------- pruning


def protected_layers(model: nn.Module, prune_head_inputs: bool = True) -> list[nn.Module]:
    """Modules torch-pruning must not prune: the Detect/Pose head and every Attention/AAttn block.

    With `prune_head_inputs`, the head's depthwise input convs (YOLO11/26 `cv3[i][0]`) are left free: a depthwise conv
    must follow the width of its input, so freezing it would also freeze the neck outputs P3-P5 that feed the head.
    The head's hidden widths and outputs stay protected either way.
    """
    out: list[nn.Module] = []
    for m in _unwrap(model).modules():
        if isinstance(m, (Attention, AAttn)):
            out.append(m)
        elif isinstance(m, Detect):
            if not prune_head_inputs:
                out.append(m)
                continue
            free: set[nn.Module] = set()
            for c in m.modules():
                if isinstance(c, Conv) and c.conv.groups == c.conv.in_channels > 1:
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
    global_pruning: bool, prune_head_inputs: bool, protect: list[str],
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
            ignored_layers=protected_layers(model, prune_head_inputs) + [model.get_submodule(n) for n in protect],
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
) -> tuple[float, int, nn.Module]:
    """Channel ratio whose pruning keeps `goal` of the target measure: (ratio, trials, best pruned copy).

    Each trial prunes a deep copy. The next guess fits kept = (1 - r) ** p through the last trial, bisecting instead
    when that leaves the bracket. p starts at 1.75: measured MACs gave 1.5 (yolov8n), 1.7 (yolo11n), 2.0 (yolo26n);
    2 would be the rule for convs whose inputs and outputs both shrink, the protected head pulls it down.
    """
    index = 0 if target == "flops" else 1
    base = _macs_params(model, x)[index]
    lo, hi = 0.0, MAX_CHANNEL_RATIO  # channel ratios known to keep too much / too little
    r, p = 1 - goal ** (1 / 1.75), 1.75
    best: tuple[float, float, nn.Module] | None = None
    trials = 0
    while trials < max_trials:
        trials += 1
        trial = _copy_with_grads(model)
        prune(trial, r)
        kept = _macs_params(trial, x)[index] / base
        if best is None or abs(kept - goal) < abs(best[1] - goal):
            best = (r, kept, trial)
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
    return best[0], trials, best[2]  # type: ignore[index] - max_trials >= 1 sets best


def prune_round(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    importance: str | tp.importance.Importance = "l2",
    round_to: int | None = 8,
    target: str = "flops",
    *,
    global_pruning: bool = False,
    prune_head_inputs: bool = True,
    tol: float = 0.01,
    max_trials: int = 5,
    protect: Iterable[nn.Module] = (),
) -> dict[str, float]:
    """Prune `model` in place by one round; return params and MACs before/after plus the channel ratio used.

    `ratio` is the fraction to remove this round of `target`: "flops" (MACs counted by torch-pruning at the input's
    size), "params", or "channels" (torch-pruning's channel pruning ratio, used as is). For flops/params the channel
    ratio is searched on deep copies (at most `max_trials`, each ~2-6 s on CPU for yolo11n) until the kept fraction
    is within `tol`: no closed form fits, since the protected head keeps its widths. Measured on yolo11n at 256 px,
    channel ratio 0.5 keeps 41% of MACs (50% with `prune_head_inputs=False`), not the 25% of the (1 - r)^2 rule.

    The head and attention are always protected (`protected_layers`); `protect` adds modules of `model` to that.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise PruneConfigError(f"prune ratio: expected a float in (0, 1) (share to remove this round), got {ratio!r}")
    if target not in MEASURES:
        raise PruneConfigError(f"prune target: expected one of {', '.join(MEASURES)}, got {target!r}")
    if max_trials < 1:
        raise PruneConfigError(f"max_trials: expected an int >= 1, got {max_trials!r}")
    imp = build_importance(importance) if isinstance(importance, str) else importance
    model = _unwrap(model)
    make_split_free(model)
    bad = unsupported_blocks(model)
    if bad:
        raise ModelError(f"cannot prune a model with {', '.join(bad)} blocks: they split tensors in ways torch-pruning "
                         "cannot follow; use a YOLOv8/11/26 detect or pose model")
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
        _prune_channels(m, x, r, imp, round_to, global_pruning, prune_head_inputs, protect_names)

    trials, channel_ratio = 0, ratio
    if target == "channels":
        prune(model, ratio)
    else:
        channel_ratio, trials, best = _search_channel_ratio(model, prune, x, 1 - ratio, target, tol, max_trials)
        # The best trial copy becomes the model: same object for the caller, no second (slow, and for random
        # importance different) pruning pass. Its submodules are new objects, like after any torch-pruning step.
        model.__dict__.clear()
        model.__dict__.update(best.__dict__)
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


# -------------------------------------------------------------------------------------------------------- sparsity


def add_bn_l1_grad(model: nn.Module, lam: float, skip: Iterable[nn.Module] | None = None) -> int:
    """Network slimming: add `lam * sign(gamma)` (the L1 penalty's gradient) to every BN weight's grad, in place.

    Call after the loss backward and `scaler.unscale_`, before the optimizer step. BNs inside `skip` (default: the
    protected head and attention, which are never pruned) are left alone. Returns the number of BNs changed.
    """
    model = _unwrap(model)
    skipped = {id(m) for s in (protected_layers(model, False) if skip is None else skip) for m in s.modules()}
    n = 0
    for m in model.modules():
        grad = m.weight.grad if isinstance(m, nn.BatchNorm2d) and m.weight is not None else None
        if grad is not None and id(m) not in skipped:
            grad.add_(torch.sign(m.weight.detach()), alpha=lam)
            n += 1
    return n


# ------------------------------------------------------------------------------------------------------ fine-tuning


def _is_pruned_yaml(cfg: Any) -> bool:
    return isinstance(cfg, dict) and PRUNED_YAML_KEY in cfg


class _KeepModel:
    """Trainer mixin: train the given (pruned) module as is instead of rebuilding it from model.yaml.

    `bn_l1 > 0` adds network-slimming sparsity to every optimizer step (see `add_bn_l1_grad`).
    """

    bn_l1: float = 0.0

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        if isinstance(weights, nn.Module):
            head = weights.model[-1]
            data = self.data  # type: ignore[attr-defined]
            if getattr(head, "nc", data["nc"]) != data["nc"]:
                raise ModelError(f"{data.get('yaml_file', 'data')}: dataset has {data['nc']} classes but the pruned "
                                 f"model has {head.nc}; a pruned head cannot change, fine-tune on the same dataset")
            kpt = getattr(head, "kpt_shape", None)
            if kpt is not None and "kpt_shape" in data and list(kpt) != list(data["kpt_shape"]):
                raise ModelError(f"{data.get('yaml_file', 'data')}: dataset kpt_shape {data['kpt_shape']} differs "
                                 f"from the pruned model's {list(kpt)}")
            return weights
        if _is_pruned_yaml(cfg):
            raise ModelError("a pruned model cannot be rebuilt from its model.yaml; train it with pretrained=True "
                             "(the default) so the pruned weights are used")
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)  # type: ignore[misc]

    def optimizer_step(self) -> None:
        if self.bn_l1 > 0:
            # Gradients are still scaled by AMP here; scaling the penalty the same way makes it lam after unscale_.
            add_bn_l1_grad(self.model, self.bn_l1 * self.scaler.get_scale())  # type: ignore[attr-defined]
        super().optimizer_step()  # type: ignore[misc]


class PrunedDetectionTrainer(_KeepModel, DetectionTrainer):
    """DetectionTrainer that fine-tunes the pruned module it is given (never rebuilt from model.yaml)."""


class PrunedPoseTrainer(_KeepModel, PoseTrainer):
    """PoseTrainer that fine-tunes the pruned module it is given (never rebuilt from model.yaml)."""


class _KeepModelDistill(_KeepModel):
    """Trainer mixin for distilling into a pruned student: the given module as is, plus adapters sized from it.

    `_DistillMixin.get_model` cannot be reused: it rebuilds the student from model.yaml (stale after pruning) and
    then loads the weights into it, which fails on the changed widths.
    """

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        model = super().get_model(cfg=cfg, weights=weights, verbose=verbose)
        if ADAPTERS not in model._modules:  # an unpruned rebuild through _DistillMixin already has them
            channels = check_pair(self.teacher, model, int(self.args.imgsz))  # type: ignore[attr-defined]
            setattr(model, ADAPTERS, build_adapters(self.distill.loss, channels))  # type: ignore[attr-defined]
        return model


class PrunedDistillDetectionTrainer(_KeepModelDistill, DistillDetectionTrainer):
    """Distillation fine-tune of a pruned detector: keeps its widths, adds the teacher's loss (column dis_loss)."""


class PrunedDistillPoseTrainer(_KeepModelDistill, DistillPoseTrainer):
    """Distillation fine-tune of a pruned pose model: keeps its widths, adds the teacher's loss (column dis_loss)."""


TRAINERS: dict[str, type] = {"detect": PrunedDetectionTrainer, "pose": PrunedPoseTrainer}
DISTILL_TRAINERS: dict[str, type] = {"detect": PrunedDistillDetectionTrainer, "pose": PrunedDistillPoseTrainer}


def finetune(
    model_pt: Path,
    data_yaml: Path,
    epochs: int,
    imgsz: int,
    batch: int,
    lr0: float,
    work_dir: Path,
    seed: int,
    *,
    bn_l1: float = 0.0,
    distill: DistillConfig | None = None,
    callbacks: Mapping[str, Callable[[Any], None]] | None = None,
    **train_args: Any,
) -> Path:
    """Fine-tune the pruned checkpoint `model_pt` under `work_dir` (emptied first); return best.pt.

    `train_args` go to Ultralytics' trainer as is (workers, device, optimizer, mosaic, plots, ...). With `distill`
    (its `teacher` a local .pt) the fine-tune adds that distillation loss; best.pt is then stripped of the adapters.
    Raises ModelError if the trained model's parameter count differs from the pruned one (a silent rebuild).
    """
    model_pt, work_dir = Path(model_pt), Path(work_dir)
    if not model_pt.is_file():
        raise ModelError(f"{model_pt}: pruned model not found; run the prune stage first")
    model = YOLO(str(model_pt))
    if model.task not in TRAINERS:
        raise ModelError(f"{model_pt}: task {model.task!r} cannot be fine-tuned here; expected one of "
                         f"{', '.join(TRAINERS)}")
    pruned = count_params(model)
    for p in model.model.parameters():  # save_pruned freezes them; the trainer would unfreeze each with a warning
        p.requires_grad_(True)
    trainer = (TRAINERS if distill is None else DISTILL_TRAINERS)[model.task]
    if bn_l1 > 0:
        trainer = type(trainer.__name__, (trainer,), {"bn_l1": bn_l1, "__module__": __name__})
    if distill is not None:
        trainer = functools.partial(trainer, distill=distill)  # how make_trainer binds it
    for event, fn in (callbacks or {}).items():
        model.add_callback(event, fn)
    shutil.rmtree(work_dir, ignore_errors=True)
    # A named optimizer, since 'auto' ignores lr0.
    args = {"optimizer": "AdamW", "deterministic": True, "verbose": False, "exist_ok": True, **train_args}
    model.train(trainer=trainer, data=str(data_yaml), epochs=epochs, imgsz=imgsz, batch=batch, lr0=lr0, seed=seed,
                project=str(work_dir.parent.resolve()), name=work_dir.name, **args)
    best = Path(model.trainer.best)
    if not best.is_file():
        best = Path(model.trainer.last)
    trained = count_params(YOLO(str(best)))
    if trained != pruned:
        raise ModelError(f"{best}: fine-tuning changed the parameter count from {pruned} to {trained}; the pruned "
                         "model was rebuilt from its yaml")
    return best


def prune_finetune_round(
    src: Path,
    dst: Path,
    ratio: float,
    work_dir: Path,
    score: Callable[[Path], float],
    *,
    importance: str = "l2",
    round_to: int | None = 8,
    measure: str = "flops",
    imgsz: int = 640,
    data_yaml: Path,
    epochs: int,
    calib: Sequence[dict[str, Any]] = (),
    meta: Mapping[str, Any] | None = None,
    **finetune_args: Any,
) -> dict[str, float]:
    """One round from checkpoint `src` to checkpoint `dst`: prune by `ratio`, score, fine-tune `epochs` epochs.

    `calib` batches give taylor importance its gradients right before pruning, and the pruned model its BatchNorm
    statistics (`recalibrate_bn`) right after. `score(pt)` is called on the pruned, not yet fine-tuned model
    (`map50_95_before` in the result, beside prune_round's numbers). `finetune_args` go to `finetune` (imgsz included).
    `dst` is written atomically with prune_round's numbers and `meta` in its metadata.
    """
    model = YOLO(str(src)).model.float()
    if calib and importance == "taylor":
        taylor_backward(model, calib)
    x = torch.zeros(1, model.yaml.get("channels", 3), imgsz, imgsz)
    info: dict[str, float] = prune_round(model, x, ratio, importance, round_to, measure)
    if calib:
        recalibrate_bn(model, calib)
    pruned = save_pruned(model, Path(work_dir) / "pruned.pt", meta={**(meta or {}), **info})
    info["map50_95_before"] = score(pruned)
    best = (finetune(pruned, data_yaml, epochs, imgsz=imgsz, work_dir=Path(work_dir) / "ft", **finetune_args)
            if epochs else pruned)
    # fp16 like the trainer's own checkpoints, so file sizes compare fairly with the unpruned models
    save_pruned(YOLO(str(best)).model, dst, meta={**(meta or {}), **info}, half=True)
    return info


def pick_round(maps_after: Sequence[float], base_map: float, max_drop: float) -> int:
    """1-based round to keep: the last (most pruned) round whose mAP is at most `max_drop` below `base_map`, else 1.

    Rounds only ever remove more, so the last acceptable round is the smallest model within the bound. Round 1 is
    the fallback when none is: it is the least pruned model there is.
    """
    ok = [k for k, m in enumerate(maps_after, 1) if base_map - m <= max_drop]
    return ok[-1] if ok else 1


# --------------------------------------------------------------------------------------------------------- saving


def save_pruned(model: nn.Module, path: Path, meta: Mapping[str, Any] | None = None, half: bool = False) -> Path:
    """Write an Ultralytics-loadable checkpoint of `model` atomically (temp file in the same folder, then rename).

    The format matches the trainer's final checkpoints (`model`, `train_args`, `date`, `version`, ...); `YOLO(path)`
    loads the pickled pruned module. model.yaml is kept (Ultralytics reads task, nc and kpt_shape from it) but gains
    a `pruned` note saying its widths are stale. `meta` is stored under `yolo_compress`. fp32 unless `half`.
    """
    path = Path(path)
    m = copy.deepcopy(_unwrap(model)).eval()
    m.zero_grad(set_to_none=True)
    for p in m.parameters():
        p.requires_grad_(False)
    if hasattr(m, "criterion"):
        m.criterion = None
    m.yaml = {**getattr(m, "yaml", {}), PRUNED_YAML_KEY: PRUNED_YAML_NOTE}
    args = getattr(m, "args", None) or {}
    args = dict(vars(args) if isinstance(args, IterableSimpleNamespace) else args)
    m.args = args
    ckpt = {
        "date": datetime.now().astimezone().isoformat(),
        "version": ULTRALYTICS_VERSION,
        "license": "AGPL-3.0 (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,  # not resumable: a fresh fine-tune starts from here
        "model": m.half() if half else m.float(),
        "train_args": args,
        "yolo_compress": dict(meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
