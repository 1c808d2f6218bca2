"""Split-free rewrites of Ultralytics CSP blocks, so that torch-pruning can trace and prune them.

Ultralytics' C2f/C3k2/C2PSA-style blocks run one `cv1` conv and `chunk`/`split` its output in two. torch-pruning
1.6 cannot map channel indices through that split (`step()` raises IndexError), so each block is rewritten here into
an output-identical form: `cv1` becomes two Conv+BN halves (`cv1a`, `cv1b`) carrying the original weights, and the
forward pass concatenates without ever splitting a tensor.

These classes are pickled into checkpoints by their path (`yolo_compress.splitfree.X`): keep the names and
attributes stable, or old pruned checkpoints stop loading.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from ultralytics.nn.modules.block import C2, C2PSA, PSA, C2f, RepNCSPELAN4
from ultralytics.nn.modules.conv import Conv

from yolo_compress.errors import ModelError

__all__ = ["SplitFreeC2f", "SplitFreeC2", "SplitFreeC2PSA", "PSABody", "make_split_free", "unsupported_blocks",
           "check_prunable"]

# Per-layer attributes that Ultralytics' parse_model sets on top-level layers (index, from, type name, param count);
# `_predict_once` routes tensors by `f` and `i`, so a replacement must carry them.
_LAYER_ATTRS = ("i", "f", "type", "np")

# Blocks that split a tensor in ways this module does not rewrite; pruning a model holding one fails in torch-pruning.
_UNSUPPORTED = ("C2fAttn", "ADown", "CBLinear")


def _slice_param(p: nn.Parameter, keep: slice) -> nn.Parameter:
    """Rows `keep` of a parameter, with its gradient (taylor importance reads gradients taken before the rewrite)."""
    new = nn.Parameter(p.data[keep].clone(), requires_grad=p.requires_grad)
    if p.grad is not None:
        new.grad = p.grad[keep].clone()
    return new


def conv_half(conv: Conv, start: int, stop: int) -> Conv:
    """A copy of Ultralytics `Conv` keeping only output channels [start, stop) of its conv and BN."""
    if conv.conv.groups != 1:
        raise ValueError(f"cannot split a grouped conv (groups={conv.conv.groups})")
    new = copy.deepcopy(conv)
    keep = slice(start, stop)
    c = new.conv
    c.weight = _slice_param(conv.conv.weight, keep)
    if c.bias is not None:  # a fused Conv carries the BN in its bias
        c.bias = _slice_param(conv.conv.bias, keep)
    c.out_channels = stop - start
    bn = getattr(new, "bn", None)
    if isinstance(bn, nn.BatchNorm2d):
        old = conv.bn
        bn.weight, bn.bias = _slice_param(old.weight, keep), _slice_param(old.bias, keep)
        bn.running_mean = old.running_mean[keep].clone()
        bn.running_var = old.running_var[keep].clone()
        bn.num_features = stop - start
    return new


def _halves(cv1: Conv, first: int) -> tuple[Conv, Conv]:
    return conv_half(cv1, 0, first), conv_half(cv1, first, cv1.conv.out_channels)


class SplitFreeC2f(nn.Module):
    """C2f, C3k2, C2fPSA, C2fCIB, RepNCSPELAN4 and ELAN1 without the split: y = [cv1a(x), cv1b(x), m0(y[-1]), ...]."""

    def __init__(self, cv1a: Conv, cv1b: Conv, m: nn.ModuleList, cv2: nn.Module) -> None:
        super().__init__()
        self.cv1a = cv1a  # first half of the original cv1 (passes straight to cv2)
        self.cv1b = cv1b  # second half (feeds the chain of blocks m)
        self.m = m
        self.cv2 = cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1a(x), self.cv1b(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SplitFreeC2(nn.Module):
    """C2 without the split: cv2(cat(m(cv1a(x)), cv1b(x)))."""

    def __init__(self, cv1a: Conv, cv1b: Conv, m: nn.Module, cv2: nn.Module) -> None:
        super().__init__()
        self.cv1a, self.cv1b, self.m, self.cv2 = cv1a, cv1b, m, cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.m(self.cv1a(x)), self.cv1b(x)), 1))


class PSABody(nn.Module):
    """The attention + feed-forward body of a YOLOv10 PSA block: b + attn(b), then + ffn(.)."""

    def __init__(self, attn: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn, self.ffn = attn, ffn

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        b = b + self.attn(b)
        return b + self.ffn(b)


class SplitFreeC2PSA(nn.Module):
    """C2PSA and PSA without the split: cv2(cat(cv1a(x), m(cv1b(x))))."""

    def __init__(self, cv1a: Conv, cv1b: Conv, m: nn.Module, cv2: nn.Module) -> None:
        super().__init__()
        self.cv1a, self.cv1b, self.m, self.cv2 = cv1a, cv1b, m, cv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(torch.cat((self.cv1a(x), self.m(self.cv1b(x))), 1))


def _convert(block: nn.Module) -> nn.Module:
    """The split-free equivalent of `block`, or `block` itself when it needs no rewrite."""
    # Exact type checks: a subclass that overrides forward (e.g. C2fAttn-like) must not be rewritten silently.
    if isinstance(block, C2f) and type(block).forward is C2f.forward:  # C2f, C3k2, C2fPSA, C2fCIB
        new: nn.Module = SplitFreeC2f(*_halves(block.cv1, block.c), block.m, block.cv2)
    elif isinstance(block, RepNCSPELAN4) and type(block).forward is RepNCSPELAN4.forward:  # and ELAN1
        first = block.cv1.conv.out_channels // 2  # chunk(2) puts ceil(c/2) first; c3 is even in every yaml
        new = SplitFreeC2f(*_halves(block.cv1, first), nn.ModuleList([block.cv2, block.cv3]), block.cv4)
    elif type(block) is C2:
        new = SplitFreeC2(*_halves(block.cv1, block.c), block.m, block.cv2)
    elif type(block) is C2PSA:
        new = SplitFreeC2PSA(*_halves(block.cv1, block.c), block.m, block.cv2)
    elif type(block) is PSA:
        new = SplitFreeC2PSA(*_halves(block.cv1, block.c), PSABody(block.attn, block.ffn), block.cv2)
    else:
        return block
    new.c = getattr(block, "c", None)
    for attr in _LAYER_ATTRS:
        if hasattr(block, attr):
            setattr(new, attr, getattr(block, attr))
    new.train(block.training)
    return new


def make_split_free(model: nn.Module) -> nn.Module:
    """Rewrite every C2/C2f/C3k2/C2fPSA/C2fCIB/C2PSA/PSA/RepNCSPELAN4/ELAN1 in `model` in place; return `model`.

    The outputs are unchanged: each half conv computes exactly the channels the split used to hand on.
    Idempotent: already rewritten blocks are left alone.
    """

    def rewrite(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            new = _convert(child)
            if new is not child:
                setattr(parent, name, new)
            rewrite(new)

    rewrite(model)
    return model


def unsupported_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks in `model` that split tensors in a way torch-pruning cannot follow (sorted, unique)."""
    return sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in _UNSUPPORTED})


def check_prunable(model: nn.Module, what: str) -> None:
    """ModelError, naming `what` (a params key and file), when `model` has a block torch-pruning cannot follow."""
    bad = unsupported_blocks(model)
    if bad:
        raise ModelError(f"{what} has {', '.join(bad)} blocks, which torch-pruning cannot follow; prune a "
                         "YOLOv8/11/26 detect or pose model")


# Pruned checkpoints hold these classes: once this module is imported, torch's weights_only unpickler accepts them
# (models.py imports it, so every checkpoint load does).
PROJECT_CLASSES = (SplitFreeC2f, SplitFreeC2, SplitFreeC2PSA, PSABody)
torch.serialization.add_safe_globals(list(PROJECT_CLASSES))
