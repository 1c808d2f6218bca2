from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from ultralytics.nn.modules.block import C2, C2PSA, ELAN1, PSA, Attention, C2f, C2fAttn, C2fCIB, C2fPSA, RepNCSPELAN4
from ultralytics.nn.tasks import DetectionModel, PoseModel

from yolo_compress.errors import ModelError, ParamsError
from yolo_compress.models import YOLO, count_params
from yolo_compress.prune import channel_pruning
from yolo_compress.prune.channel_pruning import PruneConfigError, build_importance, prune_round
from yolo_compress.prune.rounds import (
    calibration_batches,
    finetune,
    prune_schedule,
    recalibrate_bn,
    replace_activation,
    save_pruned,
    taylor_backward,
)
from yolo_compress.splitfree import SplitFreeC2, SplitFreeC2f, SplitFreeC2PSA, make_split_free
from yolo_compress.train.trainer import CompressDetectionTrainer, CompressPoseTrainer, TrainerSpec, add_bn_l1_grad

FAMILIES = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml", "yolo11n-pose.yaml"]
X64 = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN distinct statistics: a fresh model's identical BNs would hide a mis-sliced half."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.randn(n, generator=g)
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


def tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a nested model output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors(o)]
    return []


def run(model: nn.Module, x: torch.Tensor = X64) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return tensors(model(x))


def detection_model(cfg: str = "yolo11n.yaml", nc: int = 2) -> nn.Module:
    cls = PoseModel if "pose" in cfg else DetectionModel
    return cls(cfg, nc=nc, verbose=False)


# ------------------------------------------------------------------------------------------------- split-free


@pytest.mark.parametrize("cfg", FAMILIES)
def test_split_free_rewrite_leaves_outputs_identical(cfg: str) -> None:
    model = randomize_bn(YOLO(cfg).model)
    before = run(model)
    assert make_split_free(model) is model
    assert not any(isinstance(m, (C2f, C2PSA)) for m in model.modules())
    assert any(isinstance(m, SplitFreeC2f) for m in model.modules())
    after = run(model)
    assert len(after) == len(before) > 0
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() == 0.0
    assert run(make_split_free(model))[0].equal(after[0])  # idempotent


def test_split_free_halves_carry_gradients() -> None:
    block = C2f(16, 16, n=1)
    block(torch.rand(1, 16, 8, 8)).sum().backward()
    grad = block.cv1.conv.weight.grad.clone()
    new = make_split_free(nn.Sequential(block))[0]
    assert torch.equal(torch.cat([new.cv1a.conv.weight.grad, new.cv1b.conv.weight.grad]), grad)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (C2(32, 32, n=1), SplitFreeC2),
        (C2fPSA(128, 128, n=1), SplitFreeC2f),
        (C2fCIB(32, 32, n=1), SplitFreeC2f),
        (RepNCSPELAN4(32, 32, 32, 16, 1), SplitFreeC2f),
        (ELAN1(32, 32, 32, 16), SplitFreeC2f),
        (PSA(128, 128), SplitFreeC2PSA),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_split_free_rewrite_of_other_csp_blocks(block: nn.Module, expected: type) -> None:
    model = randomize_bn(nn.Sequential(block))
    x = torch.rand(2, 32 if block.cv1.conv.in_channels == 32 else 128, 16, 16)
    before = run(model, x)
    make_split_free(model)
    assert type(model[0]) is expected
    assert expected.__module__ == "yolo_compress.splitfree"  # the class path pickled into checkpoints
    assert torch.equal(run(model, x)[0], before[0])


def test_split_free_keeps_the_layer_routing_attributes() -> None:
    model = YOLO("yolo11n.yaml").model
    old = [(m.i, m.f, m.type) for m in model.model]
    make_split_free(model)
    assert [(m.i, m.f, m.type) for m in model.model] == old


# --------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("kind", ["geometric", "linear"])
@pytest.mark.parametrize(("target", "rounds"), [(0.5, 1), (0.5, 3), (0.3, 4), (0.9, 5)])
def test_schedule_keeps_one_minus_target_overall(kind: str, target: float, rounds: int) -> None:
    steps = prune_schedule(target, rounds, kind)
    assert len(steps) == rounds
    assert all(0 < s < 1 for s in steps)
    assert abs(math.prod(1 - s for s in steps) - (1 - target)) < 1e-9
    if kind == "geometric":
        assert max(steps) - min(steps) < 1e-12
    else:
        kept = 1.0
        for i, s in enumerate(steps, 1):
            kept *= 1 - s
            assert abs((1 - kept) - target * i / rounds) < 1e-9


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((0.0, 3), "prune.target"),
        ((1.0, 3), "prune.target"),
        ((-0.2, 3), "prune.target"),
        ((True, 3), "prune.target"),
        ((0.5, 0), "prune.rounds"),
        ((0.5, 2.0), "prune.rounds"),
        ((0.5, 2, "cubic"), "prune.schedule: expected one of geometric, linear"),
    ],
)
def test_schedule_rejects_bad_settings(args: tuple, needle: str) -> None:
    with pytest.raises(PruneConfigError, match=needle) as err:
        prune_schedule(*args)
    assert isinstance(err.value, ValueError) and isinstance(err.value, ParamsError)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------- importance


def test_importances_by_name_and_unknown_name() -> None:
    for name in channel_pruning.IMPORTANCES:
        assert callable(build_importance(name))
    with pytest.raises(ValueError, match=r"prune.importance: expected one of l1, l2, bn, taylor, random, got 'l3'"):
        build_importance("l3")


# ---------------------------------------------------------------------------------------------------- pruning


@pytest.fixture(scope="module")
def pruned11(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """yolo11n (2 classes) pruned once at channel ratio 0.5, with what was true before, and both saved."""
    root = tmp_path_factory.mktemp("ckpt")
    model = detection_model("yolo11n.yaml")
    shapes = [t.shape for t in run(model)]
    full = save_pruned(model, root / "full.pt")
    model.train()
    stride = model.stride.clone()
    result = prune_round(model, X64, 0.5, "l2", target="channels")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    pruned = save_pruned(model, root / "pruned.pt", meta={"round": 1, **result})
    return {"model": model, "result": result, "shapes": shapes, "stride": stride, "training": model.training,
            "requires_grad": grads, "full": full, "pruned": pruned, "params": count_params(model)}


def test_prune_round_halves_channels_and_keeps_head_outputs(pruned11: dict[str, Any]) -> None:
    model, result = pruned11["model"], pruned11["result"]
    assert result["params_after"] < 0.5 * result["params_before"]
    assert result["macs_after"] < 0.6 * result["macs_before"]
    assert result["params_after"] == count_params(model)
    assert pruned11["training"]  # the caller's mode is restored (torch-pruning traces in eval mode)
    assert all(flag for n, flag in pruned11["requires_grad"].items() if ".dfl" not in n)
    assert [t.shape for t in run(model)][:1] == pruned11["shapes"][:1]  # decoded (1, 4 + nc, anchors) output
    head = model.model[-1]
    assert torch.equal(model.stride, pruned11["stride"]) and torch.equal(head.stride, pruned11["stride"])
    # Protected: the head's outputs and hidden widths, and the attention inside C2PSA.
    assert [s[-1].out_channels for s in head.cv2] == [64] * 3 and [s[-1].out_channels for s in head.cv3] == [2] * 3
    assert [s[0].conv.out_channels for s in head.cv2] == [64] * 3
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    assert attn.qkv.conv.out_channels == 256 and attn.proj.conv.out_channels == 128
    # The neck outputs that feed the head were pruned too (its depthwise input convs follow them).
    assert [s[0].conv.in_channels for s in head.cv2] == [32, 64, 128]


def test_prune_round_frozen_head_keeps_neck_outputs_and_random_importance_runs() -> None:
    torch.manual_seed(0)
    model = detection_model("yolo26n.yaml")
    result = prune_round(model, X64, 0.5, "random", target="channels", head="none")
    assert result["params_after"] < result["params_before"] and result["macs_after"] < result["macs_before"]
    head = model.model[-1]
    # The depthwise convs at the head's inputs couple the neck outputs to the frozen head.
    assert [s[0].conv.in_channels for s in head.cv2] == [64, 128, 256]
    assert [s[0].conv.in_channels for s in head.one2one_cv2] == [64, 128, 256]
    run(model)


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo11n-pose.yaml"])
def test_head_hidden_mode_shrinks_branch_widths_but_keeps_the_outputs(cfg: str) -> None:
    torch.manual_seed(0)
    model = detection_model(cfg)
    shapes = [t.shape for t in run(model)]
    prune_round(model, X64, 0.5, "l2", target="channels", head="hidden")
    head = model.model[-1]
    branches = [head.cv2, head.cv3, *([head.cv4] if hasattr(head, "cv4") else [])]
    finals = [[s[-1] for s in b] for b in branches]
    assert all(isinstance(f, nn.Conv2d) for b in finals for f in b)
    assert [f.out_channels for f in finals[0]] == [64] * 3 and [f.out_channels for f in finals[1]] == [2] * 3
    if hasattr(head, "cv4"):
        assert [f.out_channels for f in finals[2]] == [head.nk] * 3
    assert all(s[1].conv.out_channels < 64 for s in head.cv2)  # the box branch's hidden width was 64
    assert all(f.in_channels < 64 for f in finals[0])  # so the protected output convs lost inputs, not outputs
    assert [t.shape for t in run(model)][:1] == shapes[:1]  # decoded predictions: same layout
    assert torch.equal(head.dfl.conv.weight, torch.arange(16, dtype=torch.float).view(1, 16, 1, 1))


def test_head_mode_is_checked() -> None:
    with pytest.raises(PruneConfigError, match=r"^prune\.head: expected one of none, inputs, hidden, got 'all'"):
        prune_round(small_net(), X64, 0.5, target="channels", head="all")


def small_net() -> nn.Module:
    """A plain conv net: the flops search logic without YOLO's slow tracing."""
    from ultralytics.nn.modules.conv import Conv

    return nn.Sequential(Conv(3, 32, 3, 2), Conv(32, 64, 3, 1), Conv(64, 64, 3, 2), Conv(64, 128, 3, 1),
                         nn.Conv2d(128, 10, 1))


@pytest.mark.parametrize("target", ["flops", "params"])
def test_prune_round_searches_the_channel_ratio_for_a_flops_or_params_target(target: str) -> None:
    net = small_net()
    # round_to=None: the search is under test here, not the steps that rounding widths to 8 puts in the measure
    result = prune_round(net, X64, 0.6, "l2", round_to=None, target=target, tol=0.02, protect=[net[4]])
    key = "macs" if target == "flops" else "params"
    assert abs(result[f"{key}_after"] / result[f"{key}_before"] - 0.4) <= 0.02
    assert abs(result["removed"] - 0.6) <= 0.02 and 1 <= result["trials"] <= 5
    assert 0 < result["channel_ratio"] < 0.6  # fewer channels than the measure: conv cost is ~quadratic in width
    assert net[4].out_channels == 10 and run(net, X64)[0].shape == (1, 10, 16, 16)


def test_prune_round_pose_with_bn_importance() -> None:
    model = randomize_bn(detection_model("yolo11n-pose.yaml", nc=1))
    model.eval()
    with torch.no_grad():
        y, preds = model(X64)
    result = prune_round(model, X64, 0.3, "bn", target="channels")
    assert result["params_after"] < result["params_before"]
    model.eval()
    with torch.no_grad():
        y2, preds2 = model(X64)
    assert y2.shape == y.shape == (1, 4 + 1 + 17 * 3, 84)
    shapes = {k: v.shape for k, v in preds.items() if k != "feats"}  # feats are the (pruned) neck outputs
    assert {k: v.shape for k, v in preds2.items() if k != "feats"} == shapes


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"ratio": 0.0}, PruneConfigError, "prune ratio"),
        ({"ratio": 1.0}, PruneConfigError, "prune ratio"),
        ({"importance": "magnitude"}, PruneConfigError, "prune.importance"),
        ({"target": "macs"}, PruneConfigError, "prune target: expected one of flops, params, channels"),
        ({"importance": "taylor"}, ModelError, "taylor_backward"),
    ],
)
def test_prune_round_rejects_bad_input(kwargs: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle):
        prune_round(small_net(), X64, **{"ratio": 0.5, "importance": "l2", **kwargs})


def test_prune_round_rejects_blocks_it_cannot_follow() -> None:
    with pytest.raises(ModelError, match="C2fAttn"):
        prune_round(nn.Sequential(C2fAttn(32, 32)), torch.rand(1, 32, 8, 8), 0.5, target="channels")


# ---------------------------------------------------------------------------------------------------- sparsity


def test_add_bn_l1_grad_adds_lam_sign_gamma_outside_the_head() -> None:
    model = randomize_bn(detection_model("yolov8n.yaml"))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].weight.data[0] = 0.0  # sign(0) = 0: a dead channel gets no push
    for bn in bns:
        bn.weight.grad = torch.randn_like(bn.weight)
    old = {bn: bn.weight.grad.clone() for bn in bns}
    head = {id(m) for m in model.model[-1].modules()}
    n = add_bn_l1_grad(model, 1e-3)
    assert n == sum(id(bn) not in head for bn in bns) > 0
    for bn in bns:
        delta = bn.weight.grad - old[bn]
        expected = torch.zeros_like(delta) if id(bn) in head else 1e-3 * torch.sign(bn.weight.detach())
        assert torch.allclose(delta, expected, atol=1e-7)
    assert bns[0].weight.grad[0] == old[bns[0]][0]


# ---------------------------------------------------------------------------------------------------- trainers


@pytest.mark.parametrize("trainer", [CompressDetectionTrainer, CompressPoseTrainer])
def test_trainer_get_model_keeps_the_given_module(trainer: type) -> None:
    cfg = "yolo11n-pose.yaml" if trainer is CompressPoseTrainer else "yolo11n.yaml"
    model = detection_model(cfg, nc=1 if "pose" in cfg else 2)
    data = {"nc": model.model[-1].nc, "kpt_shape": list(getattr(model.model[-1], "kpt_shape", [17, 3]))}
    keep = SimpleNamespace(data=data, spec=TrainerSpec(keep_model=True), teacher=None)
    assert trainer.get_model(keep, cfg=model.yaml, weights=model) is model
    with pytest.raises(ModelError, match="classes but the pruned model has"):
        trainer.get_model(SimpleNamespace(**{**vars(keep), "data": {**data, "nc": 7}}), weights=model)
    with pytest.raises(ModelError, match="cannot be rebuilt from its model.yaml"):
        trainer.get_model(keep, cfg={**model.yaml, "pruned": "note"}, weights=None)
    plain = SimpleNamespace(data=data, spec=TrainerSpec(), teacher=None)
    with pytest.raises(ModelError, match="stale widths"):
        trainer.get_model(plain, cfg={**model.yaml, "pruned": "note"}, weights=model)


# ------------------------------------------------------------------------------------ checkpoints, fine-tune, ONNX


def make_dataset(root: Path) -> Path:
    """8 train / 4 val 64-px images, each with one red or green square and its YOLO label."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img = np.full((64, 64, 3), 40, np.uint8)
            s = int(rng.integers(12, 28))
            x0, y0 = (int(v) for v in rng.integers(0, 64 - s, 2))
            cls = i % 2
            img[y0:y0 + s, x0:x0 + s] = (0, 0, 255) if cls == 0 else (0, 255, 0)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            label = f"{cls} {(x0 + s / 2) / 64:.6f} {(y0 + s / 2) / 64:.6f} {s / 64:.6f} {s / 64:.6f}\n"
            (root / "labels" / split / f"{i}.txt").write_text(label)
    yaml_path = root / "data.yaml"
    yaml_path.write_text("train: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n")
    return yaml_path


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("squares"))


def test_save_pruned_reloads_with_its_width_in_a_fresh_process(pruned11: dict[str, Any], tmp_path: Path) -> None:
    path = pruned11["pruned"]
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # atomic: no temp file left
    code = (f"from yolo_compress.models import YOLO; m = YOLO(r'{path}'); "
            "print(m.task, sum(p.numel() for p in m.model.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["detect", str(pruned11["params"])]
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert {"model", "train_args", "date", "version"} <= set(ckpt)
    assert ckpt["yolo_compress"]["round"] == 1
    assert "widths differ" in ckpt["model"].yaml["pruned"]  # the stale yaml says so
    assert count_params(YOLO(str(pruned11["full"]))) > 2 * pruned11["params"]


def test_finetune_keeps_the_pruned_width(pruned11: dict[str, Any], data_yaml: Path, tmp_path: Path) -> None:
    best = finetune(pruned11["pruned"], data_yaml, epochs=1, imgsz=64, batch=4, lr0=0.001,
                    work_dir=tmp_path / "ft", seed=0, workers=0, device="cpu", plots=False, val=True)
    assert best.is_file() and best.parent.parent == tmp_path / "ft"
    assert count_params(YOLO(str(best))) == pruned11["params"]


def test_onnx_export_of_pruned_model_runs_and_is_smaller(pruned11: dict[str, Any], tmp_path: Path) -> None:
    import onnxruntime as ort

    sizes, shapes = {}, {}
    for name in ("full", "pruned"):
        src = tmp_path / f"{name}.pt"
        src.write_bytes(pruned11[name].read_bytes())
        onnx_path = Path(YOLO(str(src)).export(format="onnx", imgsz=64, simplify=False, verbose=False))
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        out = session.run(None, {session.get_inputs()[0].name: X64.numpy()})
        sizes[name], shapes[name] = onnx_path.stat().st_size, [o.shape for o in out]
        assert all(np.isfinite(o).all() for o in out)
    assert shapes["pruned"] == shapes["full"]
    assert sizes["pruned"] < 0.6 * sizes["full"]


def test_taylor_importance_on_real_batches(data_yaml: Path) -> None:
    batches = calibration_batches(data_yaml, imgsz=64, batch=4, n_batches=2)
    assert len(batches) == 2 and batches[0]["img"].dtype == torch.float32 and batches[0]["img"].max() <= 1
    model = detection_model("yolov8n.yaml")
    running = model.model[1].bn.running_mean.clone()
    loss = taylor_backward(model, batches)
    assert loss > 0 and torch.equal(model.model[1].bn.running_mean, running)  # eval mode: BN stats untouched
    assert model.model[0].conv.weight.grad is not None and model.model[2].cv1a.conv.weight.grad is not None
    result = prune_round(model, X64, 0.5, "taylor", target="channels")
    assert result["params_after"] < result["params_before"]
    assert all(p.grad is None for p in model.parameters())  # stale gradients of the old widths are dropped
    run(model)


def test_round_to_keeps_the_nearest_multiple_so_a_narrow_layer_is_not_halved() -> None:
    """torch-pruning floors the kept width: 5% off a 16-channel conv left 8, and the pruned model scored ~0."""
    from ultralytics.nn.modules.conv import Conv

    net = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 64, 3, 1), Conv(64, 64, 3, 2), nn.Conv2d(64, 10, 1))
    prune_round(net, X64, 0.05, "l2", round_to=8, target="channels", protect=[net[3]])
    assert [net[0].conv.out_channels, net[1].conv.out_channels, net[2].conv.out_channels] == [16, 64, 64]
    prune_round(net, X64, 0.2, "l2", round_to=8, target="channels", protect=[net[3]])
    assert [net[0].conv.out_channels, net[1].conv.out_channels, net[2].conv.out_channels] == [16, 48, 48]


def test_relu_swap_survives_reload_and_leaves_only_the_heads_sigmoid_in_onnx(tmp_path: Path) -> None:
    import onnx

    from yolo_compress.measure.benchmark import export_onnx

    def count(net: nn.Module, kind: type) -> int:  # Ultralytics' Convs share one SiLU module: count each use
        return sum(isinstance(m, kind) for _, m in net.named_modules(remove_duplicate=False))

    model = detection_model()
    silus = count(model, nn.SiLU)
    assert replace_activation(model, "keep") == 0 and silus > 50
    assert replace_activation(model, "relu") == silus > 0
    assert replace_activation(model, "relu") == 0  # a second round finds nothing left to swap
    pt = save_pruned(model, tmp_path / "relu.pt")
    reloaded = YOLO(str(pt)).model  # the safe (weights_only) loader accepts nn.ReLU
    assert count(reloaded, nn.ReLU) == silus and count(reloaded, nn.SiLU) == 0
    ops = [n.op_type for n in onnx.load(str(export_onnx(pt, 64, tmp_path / "relu.onnx"))).graph.node]
    assert ops.count("Relu") == silus and ops.count("Sigmoid") == 1  # the class scores' sigmoid in the head
    with pytest.raises(ValueError, match="prune.activation"):
        replace_activation(model, "gelu")


def test_recalibrated_batchnorm_holds_the_statistics_of_the_calibration_batches() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    batches = [{"img": torch.rand(4, 3, 16, 16) * 3 + 1} for _ in range(3)]
    with torch.no_grad():
        acts = torch.cat([net[0](b["img"]) for b in batches])
    recalibrate_bn(net, batches)
    assert not net.training and net[1].momentum == 0.1  # mode and momentum restored
    torch.testing.assert_close(net[1].running_mean, acts.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    # the running variance averages the three batches' unbiased variances
    per_batch = torch.stack([a.var(dim=(0, 2, 3)) for a in acts.split(4)]).mean(0)
    torch.testing.assert_close(net[1].running_var, per_batch, rtol=1e-4, atol=1e-5)
