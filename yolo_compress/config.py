"""Typed view of params.yaml: one dataclass per section, validated on load.

Every key has a `# (type) meaning` comment. Unknown keys, wrong types and
out-of-range values raise `ParamsError` naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yolo_compress.errors import ParamsError
from yolo_compress.typed_params import Section, build_checked, check, trace_reads

TASKS = ("detect", "pose")
OPTIMIZERS = ("SGD", "Adam", "AdamW", "auto")


def _valid_device(device: str | int) -> bool:
    # what Ultralytics' select_device accepts, caught here rather than after the data is loaded
    return isinstance(device, int) and device >= 0 or str(device) in ("cpu", "mps") or bool(
        re.fullmatch(r"\d+(,\d+)*", str(device).replace(" ", "")))


BUILT_IN_SOURCES = ("synthetic", "digits")  # data.source values made in code, not a file the user brings


@dataclass(frozen=True)
class DataConfig(Section):
    """`data:` section, read by the prepare stage."""

    source: str = "synthetic"  # (str) 'synthetic' | 'digits' (real handwriting on photos) | a yaml in data/sources/
    task: str = "detect"  # (str) synthetic task: detect | pose (digits: detect only)
    image_size: int = 256  # (int) built-in (synthetic, digits) image side in pixels
    classes: int = 6  # (int) synthetic detect classes, at least 6 (pose always has 1; digits always 10)
    keypoints: int = 11  # (int) synthetic pose keypoints per figure
    max_objects: int = 8  # (int) most labelled objects per built-in image
    train_images: int = 300  # (int) built-in images in train (300: the default run, control included, in 30 min)
    val_images: int = 100  # (int) built-in images in val
    test_images: int = 500  # (int) built-in images in test (500: a paired difference known to about ±1 point)
    test_shift_images: int = 500  # (int) built-in images in test_shift (other backgrounds, scales, contrast)
    max_unlabeled_share: float = 0.5  # (float) your dataset: refuse a split with more images lacking a label file

    def __post_init__(self) -> None:
        check(self.task in TASKS, "task", f"one of {', '.join(TASKS)}", self.task)
        check(self.source in BUILT_IN_SOURCES or self.source.endswith((".yaml", ".yml")), "source",
               f"a built-in dataset ({', '.join(BUILT_IN_SOURCES)}) or your dataset's .yaml under data/sources/",
               self.source)
        check(self.source != "digits" or self.task == "detect", "task",
               "detect when data.source is digits (it has no keypoints; pose needs source: synthetic)", self.task)
        check(64 <= self.image_size <= 2048, "image_size", "an int in [64, 2048]", self.image_size)
        check(6 <= self.classes <= 80, "classes", "an int in [6, 80]", self.classes)
        check(5 <= self.keypoints <= 17, "keypoints", "an int in [5, 17]", self.keypoints)
        check(1 <= self.max_objects <= 50, "max_objects", "an int in [1, 50]", self.max_objects)
        for split in ("train", "val", "test", "test_shift"):
            n = getattr(self, f"{split}_images")
            check(n >= 1, f"{split}_images", "an int >= 1 (an empty split cannot be trained or scored)", n)
        check(0 <= self.max_unlabeled_share <= 1, "max_unlabeled_share", "a float in [0, 1]",
               self.max_unlabeled_share)


@dataclass(frozen=True)
class TrainConfig(Section):
    """`teacher:` and `student:` sections, read by the train stage of that role."""

    model: str  # (str) Ultralytics model yaml (from scratch, e.g. yolo11n.yaml), or your .pt/.yaml in models/start/
    epochs: int = 10  # (int) training epochs
    imgsz: int = 256  # (int) train and val image size in pixels, a multiple of 32
    batch: int = 16  # (int) images per batch
    nbs: int | None = None  # (int) images per optimizer step (Ultralytics' nbs, its default 64); null = batch
    lr0: float = 0.002  # (float) initial learning rate
    optimizer: str = "AdamW"  # (str) SGD | Adam | AdamW | auto ('auto' ignores lr0)
    warmup_epochs: float = 1.0  # (float) linear warm-up epochs
    mosaic: float = 1.0  # (float) mosaic augmentation probability
    close_mosaic: int = 2  # (int) turn mosaic off for the last N epochs
    workers: int = 2  # (int) dataloader worker processes
    device: str | int = "cpu"  # (str | int) 'cpu', a GPU index like 0, or GPU indices like '0,1' (Ultralytics DDP)
    amp: bool = True  # (bool) mixed precision on GPU (Ultralytics turns it off on CPU by itself)

    def __post_init__(self) -> None:
        check(_valid_device(self.device), "device", "'cpu', 'mps', a GPU index like 0, or GPU indices like '0,1'",
               self.device)
        check(self.model.endswith((".yaml", ".yml", ".pt")), "model", "a model .yaml or a local .pt path", self.model)
        check(self.epochs >= 1, "epochs", "an int >= 1", self.epochs)
        check(self.imgsz >= 32 and self.imgsz % 32 == 0, "imgsz", "a multiple of 32, >= 32", self.imgsz)
        check(self.batch >= 1, "batch", "an int >= 1", self.batch)
        check(self.nbs is None or self.nbs >= self.batch, "nbs", f"null or an int >= batch ({self.batch})", self.nbs)
        check(0 < self.lr0 < 1, "lr0", "a float in (0, 1)", self.lr0)
        check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        check(self.warmup_epochs >= 0, "warmup_epochs", "a float >= 0", self.warmup_epochs)
        check(0 <= self.mosaic <= 1, "mosaic", "a float in [0, 1]", self.mosaic)
        check(self.close_mosaic >= 0, "close_mosaic", "an int >= 0", self.close_mosaic)
        check(self.workers >= 0, "workers", "an int >= 0", self.workers)

    @property
    def nominal_batch(self) -> int:
        """Ultralytics' `nbs`: it accumulates gradients over nbs / batch batches per optimizer step. Its default 64
        left a 150-image dataset two steps per epoch at batch 16; one step per batch learnt 3.4x the val mAP50-95 in
        40 epochs (docs/training.md)."""
        return self.nbs or self.batch


@dataclass(frozen=True)
class StudentConfig(TrainConfig):
    """`student:` section: a TrainConfig plus the teacher check."""

    min_teacher_gap: float = 0.05  # (float) warn loudly when teacher val mAP50-95 minus the student's is below this
    seed: int | None = None  # (int) training seed of student and distill; null = the global seed (seed repeats)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.seed is None or self.seed >= 0, "seed", "an int >= 0, or null for the global seed", self.seed)
        check(0 <= self.min_teacher_gap < 1, "min_teacher_gap", "a float in [0, 1)", self.min_teacher_gap)


DISTILL_LOSSES = ("sl2", "mgd", "cwd", "logit")
DISTILL_DEFAULT_WEIGHTS = {"sl2": 6.0, "mgd": 1.0, "cwd": 10.0, "logit": 1.0}  # sl2: upstream `dis`; cwd: mmrazor
DISTILL_SCHEDULES = ("constant", "cosine", "off_last")
PRUNE_IMPORTANCES = ("l1", "l2", "bn", "taylor", "random")
PRUNE_SCHEDULES = ("geometric", "linear")
PRUNE_MEASURES = ("flops", "params")
PRUNE_HEAD_MODES = ("none", "inputs", "hidden")
PRUNE_ACTIVATIONS = ("keep", "relu")
PRUNE_TEACHERS = ("distill", "input")
# the prune stage's epoch-matched control: its input fine-tuned as long as the kept round, unpruned
PRUNE_CONTROL = "prune_control"
MODEL_NAMES = ("teacher", "student", "distilled", PRUNE_CONTROL, "pruned")
EVAL_SPLITS = ("val", "test", "test_shift")
EXPORT_FORMATS = ("fp32", "int8", "fp16", "openvino_fp32", "openvino_int8")
# runtime of an exported file (its sidecar's `runtime`, its benchmark group) -> the name users know
FILE_RUNTIMES = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}


@dataclass(frozen=True)
class DistillConfig(Section):
    """`distill:` section. The student trains on the `student:` budget (same epochs, lr, seed), plus a teacher."""

    loss: str = "logit"  # (str) sl2 (Ultralytics' native formula) | mgd | cwd | logit
    teacher: str = "models/teacher.pt"  # (str) teacher .pt (same task, nc, kpts); default: train_teacher's model
    weight: float | None = None  # (float) global loss weight; null = the loss's default (sl2 6, mgd 1, cwd 10, logit 1)
    schedule: str = "constant"  # (str) weight by global step: constant | cosine (decays to 0) | off_last
    off_last_epochs: int = 0  # (int) schedule off_last: weight 0 for this many final epochs
    tau: float = 1.0  # (float) cwd: spatial softmax temperature
    mask_ratio: float = 0.65  # (float) mgd: fraction of student positions masked (lambda)
    alpha: float = 2e-5  # (float) mgd: scale of the summed L2
    kd_T: float = 5.0  # (float) logit: temperature on class scores
    ld_T: float = 10.0  # (float) logit: temperature on the DFL box-edge distributions
    kd_mode: str = "kl"  # (str) logit: kl | l2 on class scores
    conf_gate: float = 0.0  # (float) logit: anchors whose teacher max class score is below this are ignored
    kpt_weight: float = 4.0  # (float) logit: weight of the keypoint term (pose); 0: boxes and classes only
    unlabeled: str = ""  # (str) '' or a folder of unlabeled images under data/sources/; distillation loss only
    fuse_teacher: bool = True  # (bool) fold the teacher's BatchNorm into its convs (cheaper teacher forward)

    def __post_init__(self) -> None:
        check(self.loss in DISTILL_LOSSES, "loss", f"one of {', '.join(DISTILL_LOSSES)}", self.loss)
        check(self.teacher.endswith(".pt"), "teacher", "a local .pt path", self.teacher)
        check(self.weight is None or self.weight >= 0, "weight", "a float >= 0, or null for the default", self.weight)
        check(self.schedule in DISTILL_SCHEDULES, "schedule", f"one of {', '.join(DISTILL_SCHEDULES)}", self.schedule)
        check(self.off_last_epochs >= 0, "off_last_epochs", "an int >= 0", self.off_last_epochs)
        check(self.tau > 0, "tau", "a float > 0", self.tau)
        check(0 <= self.mask_ratio < 1, "mask_ratio", "a float in [0, 1)", self.mask_ratio)
        check(self.alpha > 0, "alpha", "a float > 0", self.alpha)
        check(self.kd_T > 0, "kd_T", "a float > 0", self.kd_T)
        check(self.ld_T > 0, "ld_T", "a float > 0", self.ld_T)
        check(self.kd_mode in ("kl", "l2"), "kd_mode", "one of kl, l2", self.kd_mode)
        check(0 <= self.conf_gate < 1, "conf_gate", "a float in [0, 1)", self.conf_gate)
        check(self.kpt_weight >= 0, "kpt_weight", "a float >= 0", self.kpt_weight)

    @property
    def base_weight(self) -> float:
        return DISTILL_DEFAULT_WEIGHTS[self.loss] if self.weight is None else float(self.weight)


@dataclass(frozen=True)
class PruneConfig(Section):
    """`prune:` section: iterative prune + fine-tune rounds on the distilled student (or `model`)."""

    model: str = "models/distilled.pt"  # (str) the YOLO .pt to prune; default: distill's model
    rounds: int = 4  # (int) prune + fine-tune rounds
    target: float = 0.66  # (float) fraction of `measure` removed in total after all rounds, in (0, 1)
    measure: str = "flops"  # (str) what `target` counts: flops | params
    schedule: str = "geometric"  # (str) per-round share: geometric (same keep ratio each round) | linear
    importance: str = "taylor"  # (str) l1 | l2 | bn (network slimming) | taylor (best on real images) | random
    sparsity_epochs: int = 1  # (int) importance bn: epochs of BN-gamma L1 training before the first round
    sparsity_l1: float = 1e-4  # (float) importance bn: L1 strength on BN gammas
    round_to: int = 8  # (int) keep channel counts multiples of this (fast kernels)
    head: str = "inputs"  # (str) head channels that may shrink: none | inputs (depthwise input convs) | hidden
    activation: str = "relu"  # (str) relu (SiLU -> ReLU from round 1: INT8 ONNX fuses it into the conv) | keep
    finetune_epochs: int = 2  # (int) fine-tune epochs per round
    last_round_epochs: int | None = 12  # (int) fine-tune epochs of the last round; null = finetune_epochs
    lr0: float = 0.0001  # (float) fine-tune learning rate (a tenth of what 2-epoch fine-tunes lost at 0.001)
    distill: bool = False  # (bool) fine-tune with the teacher and the distill: loss
    teacher: str = "distill"  # (str) distill: on, the teacher: distill (distill.teacher) | input (the unpruned `model`)
    max_map_drop: float = 0.01  # (float) stop once a round's val mAP50-95 drop is over this with confidence (paired)

    def round_epochs(self, k: int) -> int:
        """Fine-tune epochs of round `k` (1-based)."""
        last = self.finetune_epochs if self.last_round_epochs is None else self.last_round_epochs
        return last if k == self.rounds else self.finetune_epochs

    @property
    def sparsity_training(self) -> bool:
        """Whether BN-gamma L1 sparsity epochs run before round 1 (importance bn only)."""
        return self.importance == "bn" and self.sparsity_epochs > 0 and self.sparsity_l1 > 0

    def epochs_through(self, k: int) -> int:
        """Training epochs the round-`k` model got on top of its input: sparsity epochs, rounds 1..k's fine-tunes."""
        return (self.sparsity_epochs if self.sparsity_training else 0) + sum(map(self.round_epochs, range(1, k + 1)))

    def __post_init__(self) -> None:
        check(self.model.endswith(".pt"), "model", "a local .pt path", self.model)
        check(self.rounds >= 1, "rounds", "an int >= 1", self.rounds)
        check(0 < self.target < 1, "target", "a float in (0, 1), the fraction to remove", self.target)
        check(self.measure in PRUNE_MEASURES, "measure", f"one of {', '.join(PRUNE_MEASURES)}", self.measure)
        check(self.schedule in PRUNE_SCHEDULES, "schedule", f"one of {', '.join(PRUNE_SCHEDULES)}", self.schedule)
        check(self.importance in PRUNE_IMPORTANCES, "importance", f"one of {', '.join(PRUNE_IMPORTANCES)}",
               self.importance)
        check(self.sparsity_epochs >= 0, "sparsity_epochs", "an int >= 0", self.sparsity_epochs)
        check(self.sparsity_l1 >= 0, "sparsity_l1", "a float >= 0", self.sparsity_l1)
        check(self.round_to >= 1, "round_to", "an int >= 1", self.round_to)
        check(self.head in PRUNE_HEAD_MODES, "head", f"one of {', '.join(PRUNE_HEAD_MODES)}", self.head)
        check(self.activation in PRUNE_ACTIVATIONS, "activation", f"one of {', '.join(PRUNE_ACTIVATIONS)}",
               self.activation)
        check(self.finetune_epochs >= 0, "finetune_epochs", "an int >= 0", self.finetune_epochs)
        check(self.last_round_epochs is None or self.last_round_epochs >= 0, "last_round_epochs",
               "an int >= 0, or null for finetune_epochs", self.last_round_epochs)
        check(0 < self.lr0 < 1, "lr0", "a float in (0, 1)", self.lr0)
        check(self.teacher in PRUNE_TEACHERS, "teacher", f"one of {', '.join(PRUNE_TEACHERS)}", self.teacher)
        check(0 <= self.max_map_drop <= 1, "max_map_drop", "a float in [0, 1] (mAP50-95 points / 100)",
               self.max_map_drop)


def _check_names(values: list[str], valid: tuple[str, ...], key: str) -> None:
    check(bool(values) and all(v in valid for v in values) and len(set(values)) == len(values), key,
           f"a non-empty list of distinct names from {', '.join(valid)}", values)


@dataclass(frozen=True)
class EvaluateConfig(Section):
    """`evaluate:` section: pycocotools scoring of every model on every eval split."""

    models: list[str] = field(default_factory=lambda: list(MODEL_NAMES))  # (list) models/<name>.pt to score
    splits: list[str] | None = None  # (list) eval splits; null = every eval split the prepared data has
    conf: float = 0.5  # (float) operating point for precision/recall/F1: confidence threshold
    iou: float = 0.5  # (float) operating point: IoU for a true positive
    imgsz: int = 256  # (int) inference image size, a multiple of 32
    batch: int = 16  # (int) images per inference batch

    def __post_init__(self) -> None:
        _check_names(self.models, MODEL_NAMES, "models")
        if self.splits is not None:
            _check_names(self.splits, EVAL_SPLITS, "splits")
        check(0 <= self.conf < 1, "conf", "a float in [0, 1)", self.conf)
        check(0 < self.iou < 1, "iou", "a float in (0, 1)", self.iou)
        check(self.imgsz >= 32 and self.imgsz % 32 == 0, "imgsz", "a multiple of 32, >= 32", self.imgsz)
        check(self.batch >= 1, "batch", "an int >= 1", self.batch)


@dataclass(frozen=True)
class ExportConfig(Section):
    """`export:` section: the files a user ships (ONNX FP32, INT8, FP16; OpenVINO FP32, INT8) of some models."""

    models: list[str] = field(default_factory=lambda: ["student", "pruned"])  # (list) models/<name>.pt to export
    formats: list[str] = field(default_factory=lambda: [f for f in EXPORT_FORMATS if f != "fp16"])  # (list) of
    # EXPORT_FORMATS: fp32 | int8 | fp16 (ONNX Runtime files) | openvino_fp32 | openvino_int8 (OpenVINO IR folders)
    imgsz: int = 256  # (int) fixed input side of the exported graphs, a multiple of 32
    opset: int = 17  # (int) ONNX opset (fixed, so an upgrade does not silently change the graph)
    simplify: bool = False  # (bool) run onnxslim on the FP32 graph (needs `pip install onnxslim`)
    calib_images: int = 64  # (int) int8, openvino_int8: training images that calibrate the activation ranges
    int8_reduce_range: bool = True  # (bool) int8: 7-bit weights, ONNX Runtime's advice for x86 CPUs without VNNI

    def __post_init__(self) -> None:
        _check_names(self.models, MODEL_NAMES, "models")
        _check_names(self.formats, EXPORT_FORMATS, "formats")
        check(self.imgsz >= 32 and self.imgsz % 32 == 0, "imgsz", "a multiple of 32, >= 32", self.imgsz)
        check(13 <= self.opset <= 21, "opset", "an int in [13, 21]", self.opset)
        check(self.calib_images >= 1, "calib_images", "an int >= 1 (training images for int8 calibration)",
               self.calib_images)


@dataclass(frozen=True)
class BenchmarkConfig(Section):
    """`benchmark:` section: size, FLOPs and latency of every model, measured side by side in one run."""

    # (list) models/<name>.pt to measure; not prune_control by default: it has its input's architecture and speed
    models: list[str] = field(default_factory=lambda: [m for m in MODEL_NAMES if m != PRUNE_CONTROL])
    baseline: str = "student"  # (str) speedups are relative to this model
    imgsz: int = 256  # (int) input size, a multiple of 32
    batch: int = 8  # (int) batch for the throughput measurement (latency is always batch 1)
    warmup: int = 5  # (int) untimed runs before timing
    repeats: int = 10  # (int) timed runs per model in each round
    rounds: int = 15  # (int) rounds; the models alternate within each (order rotated), speedup = median over rounds
    max_spread: float = 0.3  # (float) flag a row whose speedup interquartile range / median over rounds is above this
    threads: int = 0  # (int) CPU threads for PyTorch and ONNX Runtime; 0 = all cores
    onnx: bool = True  # (bool) also time the exported ONNX files (models/export/) with ONNX Runtime
    device: str | int = "cpu"  # (str | int) 'cpu', or a GPU index like 0 (timed in addition to the CPU)

    def __post_init__(self) -> None:
        _check_names(self.models, MODEL_NAMES, "models")
        check(self.baseline in self.models, "baseline", f"one of the benchmarked models ({', '.join(self.models)})",
               self.baseline)
        check(self.imgsz >= 32 and self.imgsz % 32 == 0, "imgsz", "a multiple of 32, >= 32", self.imgsz)
        check(self.batch >= 1, "batch", "an int >= 1", self.batch)
        check(self.warmup >= 0, "warmup", "an int >= 0", self.warmup)
        check(self.repeats >= 3, "repeats", "an int >= 3 (p90 needs a few samples)", self.repeats)
        check(self.rounds >= 1, "rounds", "an int >= 1", self.rounds)
        check(self.max_spread > 0, "max_spread", "a float > 0", self.max_spread)
        check(self.threads >= 0, "threads", "an int >= 0 (0 = all cores)", self.threads)


@dataclass(frozen=True)
class ReportConfig(Section):
    """`report:` section: which shipped file the report recommends."""

    max_map_drop: float = 0.015  # (float) recommend the fastest file whose test mAP50-95 is within this of distilled

    def __post_init__(self) -> None:
        check(0 <= self.max_map_drop <= 1, "max_map_drop", "a float in [0, 1] (mAP50-95 points / 100)",
               self.max_map_drop)


@dataclass(frozen=True)
class Params(Section):
    """All of params.yaml."""

    data: DataConfig = field(default_factory=DataConfig)  # (section) dataset for prepare
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(model="yolo11n.yaml"))  # (section) teacher
    student: StudentConfig = field(default_factory=lambda: StudentConfig(model="yolo11n.yaml"))  # (section) student
    distill: DistillConfig = field(default_factory=DistillConfig)  # (section) distillation
    prune: PruneConfig = field(default_factory=PruneConfig)  # (section) prune + fine-tune rounds
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)  # (section) pycocotools scoring
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)  # (section) size, FLOPs, latency
    seed: int = 0  # (int) global seed: data generation, initialisation, augmentation
    resume: bool = False  # (bool) a training stage that was interrupted continues from its last.pt (else restarts)
    trust_checkpoints: bool = False  # (bool) unpickle .pt files fully, running any code they carry (else weights only)
    export: ExportConfig = field(default_factory=ExportConfig)  # (section) shipped ONNX files
    report: ReportConfig = field(default_factory=ReportConfig)  # (section) the summary's recommendation

    def __post_init__(self) -> None:
        check(self.seed >= 0, "seed", "an int >= 0", self.seed)

    @property
    def student_seed(self) -> int:
        """Training seed of the student and of distill: repeats over it leave the data and the teacher alone."""
        return self.seed if self.student.seed is None else self.student.seed


def load_params(path: str | Path = "params.yaml") -> Params:
    """Parse and validate params.yaml; raise ParamsError with a one-line message on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found; run from the repo root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    trace_reads()
    try:
        return build_checked(Params, raw, "")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def section_dict(section: Any) -> dict[str, Any]:
    """Plain dict of one params section, for logging."""
    return dataclasses.asdict(section)

