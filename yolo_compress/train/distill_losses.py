"""Distillation losses: plain functions of tensors, helpers that read YOLO head outputs, and LOSSES (per method).

Feature losses take the student feature already projected to the teacher's channels (the adapters live on the
student model, see distill.py). Every loss is exactly 0 when student and teacher inputs are identical (MGD: when the
generator reproduces the teacher) and positive otherwise. Teacher tensors are expected to carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from yolo_compress.config import DistillConfig

__all__ = [
    "LOSSES",
    "mgd_loss",
    "cwd_loss",
    "sl2_loss",
    "logit_kd_loss",
    "head_branches",
    "split_keypoints",
    "teacher_score_maps",
    "take_images",
    "clone_tree",
]

# One head branch in training format: boxes (B,4*reg_max,A), scores (B,nc,A), feats, and for pose kpts (B,K*D,A),
# (B,K,D,A) after split_keypoints.
Branch = dict[str, Any]


def mgd_loss(
    s_feat: torch.Tensor,
    t_feat: torch.Tensor,
    generator: nn.Module,
    mask_ratio: float = 0.65,
    alpha: float = 2e-5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked generative distillation (Yang et al. 2022): regenerate the teacher feature from a masked student one.

    Zeroes a random `mask_ratio` of the student's spatial positions (same mask for every channel), runs `generator`
    (3x3 conv -> ReLU -> 3x3 conv) and returns alpha * sum((generated - teacher)^2) / N. Because of the mask the loss
    is 0 only when the generator output equals the teacher feature, not merely when s_feat == t_feat. `mask`
    (N,1,H,W, 1 = keep) overrides the random draw, for tests.
    """
    n, _, h, w = s_feat.shape
    if mask is None:
        mask = (torch.rand(n, 1, h, w, device=s_feat.device) >= mask_ratio).to(s_feat.dtype)
    generated = generator(s_feat * mask)
    return alpha * F.mse_loss(generated, t_feat, reduction="sum") / n


def cwd_loss(s_feat: torch.Tensor, t_feat: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation (Shu et al. 2021): KL(softmax_HW(t/tau) || softmax_HW(s/tau)) * tau^2 / (N*C)."""
    n, c = s_feat.shape[:2]
    log_s = F.log_softmax(s_feat.reshape(n * c, -1) / tau, dim=1)
    log_t = F.log_softmax(t_feat.reshape(n * c, -1) / tau, dim=1)
    return F.kl_div(log_s, log_t, reduction="sum", log_target=True) * tau**2 / (n * c)


def sl2_loss(s_feat: torch.Tensor, t_feat: torch.Tensor, t_score: torch.Tensor) -> torch.Tensor:
    """Ultralytics' native score-weighted L2 for one level, the formula of upstream `DistillationModel.loss_sl2`
    (tests/test_distill.py checks the whole loss against a real DistillationModel).

    `t_score` is the teacher's max sigmoid class score per position, shape (N, 1, H*W) (see teacher_score_maps).
    """
    n, c = s_feat.shape[:2]
    mse = F.mse_loss(s_feat.view(n, c, -1), t_feat.view(n, c, -1), reduction="none")
    return (mse * t_score).sum() / (t_score.sum() * c + 1e-9)


def _weighted_mean(per_anchor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_anchor * weight).sum() / (weight.sum() + 1e-9)


def _box_ltrb(boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4*reg_max, A) raw box outputs -> expected (B, 4, A) left/top/right/bottom distances in grid units."""
    b, c, a = boxes.shape
    reg_max = c // 4
    if reg_max == 1:  # YOLO26 predicts the distances directly
        return boxes
    bins = torch.arange(reg_max, device=boxes.device, dtype=boxes.dtype).view(1, 1, reg_max, 1)
    return (boxes.view(b, 4, reg_max, a).softmax(2) * bins).sum(2)


def logit_kd_loss(
    s_cls: torch.Tensor,
    t_cls: torch.Tensor,
    s_dfl: torch.Tensor,
    t_dfl: torch.Tensor,
    T: float = 5.0,
    mode: str = "kl",
    conf_gate: float = 0.0,
    box_T: float = 10.0,
    s_kpt: torch.Tensor | None = None,
    t_kpt: torch.Tensor | None = None,
    kpt_weight: float = 1.0,
) -> torch.Tensor:
    """Output-level KD on raw head outputs, each anchor weighted by the teacher's max class score.

    cls (B,nc,A) logits: 'kl' = Bernoulli KL of sigmoid(x/T) summed over classes, * T^2; 'l2' = squared difference
    of sigmoid scores summed over classes. Box (B,4*reg_max,A): LD, KL of the softmax(x/box_T) edge distributions
    summed over the 4 edges, * box_T^2; when reg_max differs between the two (or is 1, YOLO26) the L1 of the expected
    edge distances instead. Keypoints (B,K,D,A) raw: the squared difference of the coordinates (grid units) and, when
    D is 3, the Bernoulli KL of the visibility scores, summed over keypoints, * kpt_weight. Anchors whose teacher score
    is below `conf_gate` get weight 0; each term is the weighted mean over anchors.
    """
    if mode not in ("kl", "l2"):
        raise ValueError(f"logit_kd_loss: mode must be 'kl' or 'l2', got {mode!r}")
    weight = t_cls.sigmoid().amax(1)  # (B, A)
    weight = weight * (weight >= conf_gate)
    if mode == "kl":
        cls_term = _bernoulli_kl(s_cls / T, t_cls / T).sum(1) * T**2
    else:
        cls_term = (s_cls.sigmoid() - t_cls.sigmoid()).pow(2).sum(1)
    loss = _weighted_mean(cls_term, weight)

    b, c, a = s_dfl.shape
    if c == t_dfl.shape[1] and c > 4:
        log_s = F.log_softmax(s_dfl.view(b, 4, c // 4, a) / box_T, dim=2)
        log_t = F.log_softmax(t_dfl.view(b, 4, c // 4, a) / box_T, dim=2)
        box_term = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum((1, 2)) * box_T**2
    else:
        box_term = (_box_ltrb(s_dfl) - _box_ltrb(t_dfl)).abs().sum(1)
    loss = loss + _weighted_mean(box_term, weight)

    if s_kpt is not None and t_kpt is not None and kpt_weight > 0:
        # Visibility is a logit: matched by squared error it made 92% of the term (measured on pose, 2026-11-30)
        kpt_term = (s_kpt[:, :, :2] - t_kpt[:, :, :2]).pow(2).sum((1, 2))
        if s_kpt.shape[2] == 3:
            kpt_term = kpt_term + _bernoulli_kl(s_kpt[:, :, 2], t_kpt[:, :, 2]).sum(1)
        loss = loss + kpt_weight * _weighted_mean(kpt_term, weight)
    return loss


def _bernoulli_kl(s_logit: torch.Tensor, t_logit: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(sigmoid(t) || sigmoid(s)) as BCE(s, p_t) - BCE(t, p_t): the same expression on both sides, so
    exactly 0 when s == t."""
    p_t = torch.sigmoid(t_logit)
    return (F.binary_cross_entropy_with_logits(s_logit, p_t, reduction="none")
            - F.binary_cross_entropy_with_logits(t_logit, p_t, reduction="none"))


def head_branches(output: Any) -> list[Branch]:
    """Training-format head branches from a model output: [one2many, one2one] for end-to-end heads, else [dict].

    Accepts the training dict or the eval tuple (decoded, dict). Each dict's 'feats' are the head inputs.
    """
    if isinstance(output, (tuple, list)):
        output = output[1]
    if "one2many" in output:
        return [output["one2many"], output["one2one"]]
    return [output]


def split_keypoints(branches: list[Branch], kpt_shape: Sequence[int] | None) -> list[Branch]:
    """Branches whose raw 'kpts' (B, K*D, A) read as (B, K, D, A), keypoint by keypoint, as the Pose head lays them
    out; unchanged without keypoints. Shallow copies: the head's own dicts stay as they were."""
    if kpt_shape is None:
        return branches
    return [{**b, "kpts": b["kpts"].view(b["kpts"].shape[0], *kpt_shape, -1)} if "kpts" in b else b for b in branches]


def teacher_score_maps(branches: list[Branch]) -> list[torch.Tensor]:
    """Per level (N, 1, H*W) teacher max sigmoid score, computed as upstream DistillationModel.loss does.

    Upstream averages the one2many and one2one logits of end-to-end heads before the sigmoid.
    """
    scores = (branches[0]["scores"] + branches[-1]["scores"]) / 2
    feats = branches[0]["feats"]
    parts = torch.split(scores, [f.shape[-2] * f.shape[-1] for f in feats], dim=-1)
    return [p.sigmoid().max(dim=1, keepdim=True).values for p in parts]


# ------------------------------------------------------------------------------------------- per-method batch losses
def _levels(s: list[Branch], t: list[Branch], adapters: nn.ModuleDict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(align(sf), tf) for align, sf, tf in zip(adapters["align"], s[0]["feats"], t[0]["feats"], strict=True)]


def _sl2(s: list[Branch], t: list[Branch], adapters: nn.ModuleDict, cfg: DistillConfig) -> torch.Tensor:
    scores = teacher_score_maps(t)
    pairs = _levels(s, t, adapters)
    return torch.stack([sl2_loss(sf, tf, sc) for (sf, tf), sc in zip(pairs, scores, strict=True)]).sum()


def _mgd(s: list[Branch], t: list[Branch], adapters: nn.ModuleDict, cfg: DistillConfig) -> torch.Tensor:
    pairs = _levels(s, t, adapters)
    return torch.stack(
        [mgd_loss(sf, tf, gen, cfg.mask_ratio, cfg.alpha) for (sf, tf), gen in zip(pairs, adapters["gen"], strict=True)]
    ).sum()


def _cwd(s: list[Branch], t: list[Branch], adapters: nn.ModuleDict, cfg: DistillConfig) -> torch.Tensor:
    return torch.stack([cwd_loss(sf, tf, cfg.tau) for sf, tf in _levels(s, t, adapters)]).sum()


def _logit(s: list[Branch], t: list[Branch], adapters: nn.ModuleDict, cfg: DistillConfig) -> torch.Tensor:
    losses = []
    for i, sb in enumerate(s):  # end-to-end: one2many->one2many, one2one->one2one; else the one branch
        tb = t[min(i, len(t) - 1)]
        losses.append(logit_kd_loss(sb["scores"], tb["scores"], sb["boxes"], tb["boxes"], T=cfg.kd_T,
                                    mode=cfg.kd_mode, conf_gate=cfg.conf_gate, box_T=cfg.ld_T,
                                    s_kpt=sb.get("kpts"), t_kpt=tb.get("kpts"), kpt_weight=cfg.kpt_weight))
    return torch.stack(losses).mean()


# method -> loss(student branches, teacher branches, adapters, cfg), unweighted; the pure formulas are above
LOSSES: dict[str, Callable[[list[Branch], list[Branch], nn.ModuleDict, DistillConfig], torch.Tensor]] = {
    "sl2": _sl2,
    "mgd": _mgd,
    "cwd": _cwd,
    "logit": _logit,
}


def take_images(x: Any, n: int) -> Any:
    """The first n images of a (nested) prediction structure."""
    if isinstance(x, torch.Tensor):
        return x[:n]
    if isinstance(x, dict):
        return {k: take_images(v, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(take_images(v, n) for v in x)
    return x


def clone_tree(x: Any) -> Any:
    """Normal tensors from inference-mode ones (inference tensors may not be saved for backward)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tree(v) for v in x)
    return x
