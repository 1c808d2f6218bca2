"""Iterative pruning rounds: the pure `prune_schedule`, prune (yolo_compress.prune.channel_pruning) -> recalibrate ->
fine-tune per round (`prune_finetune_round`), the kept round (`pick_round`) and Ultralytics-loadable checkpoints.

Fine-tuning goes through the project's trainer with `keep_model` (yolo_compress.train.trainer): the stock trainer
rebuilds the model from its (now stale) `model.yaml` and silently trains a full-width network. The prune stage's
round loop and early stop are `yolo_compress.prune.run`.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics.cfg import get_cfg
from ultralytics.utils import DEFAULT_CFG_DICT, IterableSimpleNamespace

from yolo_compress import files
from yolo_compress.config import DistillConfig
from yolo_compress.errors import ModelError
from yolo_compress.models import PRUNED_YAML_KEY, PRUNED_YAML_NOTE, YOLO, count_params, unwrap_yolo
from yolo_compress.prune.channel_pruning import PruneConfigError, prune_round
from yolo_compress.splitfree import make_split_free
from yolo_compress.train.trainer import TrainerSpec, trainer_for

__all__ = ["SCHEDULES", "calibration_batches", "finetune", "pick_round", "prune_finetune_round", "prune_schedule",
           "recalibrate_bn", "replace_activation", "save_pruned", "taylor_backward"]

LOG = logging.getLogger(__name__)

SCHEDULES = ("geometric", "linear")



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
    model = make_split_free(unwrap_yolo(model))  # before the backward: prune_round would rewrite it (grads are kept)
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


def replace_activation(model: nn.Module, kind: str) -> int:
    """Swap every SiLU of `model` for `kind` ("relu"; "keep" changes nothing), in place; returns how many.

    ONNX Runtime fuses a ReLU into the quantized conv before it, while a SiLU stays two INT8 nodes
    (QLinearSigmoid + QLinearMul): on the default pruned model they were 173 of 359 nodes.
    """
    if kind == "keep":
        return 0
    if kind != "relu":
        raise ValueError(f"prune.activation: expected keep or relu, got {kind!r}")
    swapped = 0
    for parent in unwrap_yolo(model).modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.SiLU):
                setattr(parent, name, nn.ReLU())
                swapped += 1
    return swapped


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
    """Re-estimate every BatchNorm's running mean and variance on `batches`; no weight changes.

    Pruning removes input channels of the conv before each BN, so the stored statistics no longer describe what
    reaches it (adaptive BN, as in EagleEye, Li et al. 2020). Measured on the default distilled model, round 1:
    val mAP50-95 before fine-tune 0.027 with the stale statistics, 0.078 recalibrated on 8 batches.
    """
    model = unwrap_yolo(model)
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


# ------------------------------------------------------------------------------------------------------ fine-tuning


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
    trainer = trainer_for(model.task, TrainerSpec(keep_model=True, distill=distill, bn_l1=bn_l1))
    pruned = count_params(model)
    for p in model.model.parameters():  # save_pruned freezes them; the trainer would unfreeze each with a warning
        p.requires_grad_(True)
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
    head: str = "inputs",
    activation: str = "keep",
    imgsz: int = 640,
    data_yaml: Path,
    epochs: int,
    calib: Sequence[dict[str, Any]] = (),
    meta: Mapping[str, Any] | None = None,
    **finetune_args: Any,
) -> dict[str, float]:
    """One round from checkpoint `src` to checkpoint `dst`: prune by `ratio`, score, fine-tune `epochs` epochs.

    `activation` "relu" swaps the SiLUs first (`replace_activation`; a no-op once done), so the first round's
    recalibration and fine-tune repair the swap together with the cut.

    `calib` batches give taylor importance its gradients right before pruning, and the pruned model its BatchNorm
    statistics (`recalibrate_bn`) right after. `score(pt)` is called on the pruned, not yet fine-tuned model
    (`map50_95_before` in the result, beside prune_round's numbers). `finetune_args` go to `finetune` (imgsz included).
    `dst` is written atomically with prune_round's numbers and `meta` in its metadata.
    """
    model = YOLO(str(src)).model.float()
    replace_activation(model, activation)
    if calib and importance == "taylor":
        taylor_backward(model, calib)
    x = torch.zeros(1, model.yaml.get("channels", 3), imgsz, imgsz)
    info: dict[str, float] = prune_round(model, x, ratio, importance, round_to, measure, head=head)
    if calib:
        recalibrate_bn(model, calib)
    pruned = save_pruned(model, Path(work_dir) / "pruned.pt", meta={**(meta or {}), **info})
    info["map50_95_before"] = score(pruned)
    best = (finetune(pruned, data_yaml, epochs, imgsz=imgsz, work_dir=Path(work_dir) / "ft", **finetune_args)
            if epochs else pruned)
    # fp16 like the trainer's own checkpoints, so file sizes compare fairly with the unpruned models
    save_pruned(YOLO(str(best)).model, dst, meta={**(meta or {}), **info}, half=True)
    return info


def pick_round(over_bound: Sequence[bool]) -> int:
    """1-based round to keep: the last (most pruned) round not over the bound (`over_bound[k - 1]`), else 1.

    Rounds only ever remove more, so the last acceptable round is the smallest model within the bound. Round 1 is
    the fallback when none is: it is the least pruned model there is.
    """
    ok = [k for k, over in enumerate(over_bound, 1) if not over]
    return ok[-1] if ok else 1


# --------------------------------------------------------------------------------------------------------- saving


def save_pruned(model: nn.Module, path: Path, meta: Mapping[str, Any] | None = None, half: bool = False) -> Path:
    """Write an Ultralytics-loadable checkpoint of `model` atomically (temp file in the same folder, then rename).

    The format matches the trainer's final checkpoints (`model`, `train_args`, `date`, `version`, ...); `YOLO(path)`
    loads the pickled pruned module. model.yaml is kept (Ultralytics reads task, nc and kpt_shape from it) but gains
    a `pruned` note saying its widths are stale. `meta` is stored under `yolo_compress`. fp32 unless `half`.
    """
    path = Path(path)
    m = copy.deepcopy(unwrap_yolo(model)).eval()
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
    files.write_with(path, lambda tmp: torch.save(ckpt, tmp))
    return path
