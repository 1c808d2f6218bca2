"""The study: its config, grid and math on hand-made numbers, its records, the refusal of uncommitted code, and one
tiny real run of DVC experiments (train, distill, prune, time side by side, score with pycocotools, record and commit,
report; then a new machine's view: records only, resumed, code changed)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tiny_pipeline import GIT, REPO, copy_repo, run
from yolo_compress.errors import ParamsError, UserError
from yolo_compress.experiments.study import check_committed, check_params, overhead_path
from yolo_compress.experiments.study_plan import (
    PLAIN,
    Scored,
    StudyConfig,
    StudyPart,
    apply_overrides,
    load_study,
    method_rows,
    models_to_prune,
    plan_part,
    plan_prune,
    plateau_gain,
    plateaued,
    set_arguments,
    verdict,
)
from yolo_compress.experiments.study_records import (
    estimate_seconds,
    keys_that_differ,
    load_records,
    planned_epochs,
    why_stale,
)
from yolo_compress.experiments.study_report import format_study, kd_recovery


def _study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_the_shipped_study_has_its_parts() -> None:
    study = load_study(REPO / "study.yaml")
    assert {"digits", "pose"} <= set(study.parts)
    assert study.parts["digits"].metric == "map50_95" and study.parts["pose"].metric == "pose_map50_95"
    assert study.parts["digits"].longest == "plateau"


@pytest.mark.parametrize("config", sorted(p.name for p in REPO.glob("study*.yaml")))
def test_every_shipped_study_configs_params_are_valid(tmp_path: Path, config: str) -> None:
    study = load_study(REPO / config)
    from yolo_compress.config import load_params  # every experiment's params.yaml must validate
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, part in study.parts.items():
        for p in plan_part(name, part):
            (tmp_path / "p.yaml").write_text(yaml.safe_dump(apply_overrides(base, p.overrides)))
            assert load_params(tmp_path / "p.yaml").student.epochs == part.schedules[p.schedule]


def test_follow_up_studies_agree_with_study_yaml_on_the_parts_they_share() -> None:
    # a follow-up part named like one of study.yaml's shares its experiments by name, so the two must not disagree
    main = load_study(REPO / "study.yaml")
    shared = 0
    for config in sorted(REPO.glob("study_*.yaml")):
        for name, part in load_study(config).parts.items():
            if name not in main.parts:
                continue
            shared += 1
            ours = main.parts[name]
            assert part.params == ours.params, f"{config.name}: parts.{name}.params"
            assert all(ours.schedules.get(s, e) == e for s, e in part.schedules.items()), config.name
            assert all(ours.prune.get(r, o) == o for r, o in part.prune.items()), config.name
    assert shared  # study_pose_kpt.yaml's pose part is study.yaml's


@pytest.mark.parametrize(("text", "message"), [
    ("parts: {a: {losses: [kd]}}", r"study\.yaml: parts\.a\.losses: expected a non-empty list of sl2, mgd"),
    ("parts: {a: {seeds: []}}", r"parts\.a\.seeds: expected a non-empty list of ints"),
    ("parts: {a: {schedules: {short: 0}}}", r"parts\.a\.schedules: expected names mapped to student\.epochs >= 1"),
    ("parts: {a: {params: {epochs: 3}}}", r"parts\.a\.params: expected dotted params keys"),
    ("parts: {a: {seed: [1]}}", r"unknown key 'parts\.a\.seed'; valid keys in parts\.a: params, schedules"),
    ("plateau_gain: 0.005", r"parts: expected a mapping of part names"),
    ("parts: {a: {}}\nplateau_gain: 2", r"plateau_gain: expected a float in \(0, 1\)"),
    ("parts: {a-b: {}}", r"parts: expected names of letters, digits and _, got 'a-b'"),
    ("parts: {a: {schedules: {long run: 3}}}", r"parts\.a\.schedules: expected names of letters, digits and _"),
    ("parts: {a: {prune: {x: {finetune_epochs: 3}}}}", r"parts\.a\.prune\.x: expected a mapping of prune\.\* keys"),
    ("parts: {a: {prune: {x y: {}}}}", r"parts\.a\.prune: expected names of letters, digits and _, got 'x y'"),
    ("parts: {a: {against: b}}", r"parts\.a\.against: expected '' or another part \(none\), got 'b'"),
    ("parts: {a: {}, b: {against: b}}", r"parts\.b\.against: expected '' or another part \(a\), got 'b'"),
])
def test_bad_study_yaml_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_study(_study(tmp_path, text))


def test_grid_pairs_every_loss_with_each_seed_and_schedule() -> None:
    part = StudyPart(params={"teacher.epochs": 5}, schedules={"short": 2, "long": 8}, losses=["sl2", "logit"],
                     seeds=[0, 3])
    plan = plan_part("x", part)
    assert len(plan) == 8 and len({p.name for p in plan}) == 8
    p = next(p for p in plan if (p.schedule, p.loss, p.seed) == ("long", "logit", 3))
    assert p.name == "study-x-long-logit-s3" and p.target == "distill"
    assert p.overrides == {"teacher.epochs": 5, "student.epochs": 8, "student.seed": 3, "distill.loss": "logit"}
    assert plan_prune("x", part, p) == []  # no recipes, no pruning
    recipes = StudyPart(schedules={"long": 8}, prune={"default": {}, "ft10": {"prune.finetune_epochs": 10}}).prune
    default, ft10 = plan_prune("x", StudyPart(schedules={"long": 8}, prune=recipes), p)
    assert default.target == ft10.target == "prune"
    assert default.name == "study-x-long-pruned_default-logit-s3" and default.overrides == p.overrides
    assert ft10.recipe == "ft10" and ft10.overrides == {**p.overrides, "prune.finetune_epochs": 10}


def test_recipes_prune_the_best_model_or_each_seed_of_the_best_loss() -> None:
    part = StudyPart(schedules={"short": 2, "long": 8}, losses=["sl2", "logit"], seeds=[0, 1], prune={"r": {}})
    val = {("sl2", 0): 0.50, ("logit", 0): 0.45, ("logit", 1): 0.44, ("sl2", 1): 0.30}
    assert [p.name for p in models_to_prune("x", part, val)] == ["study-x-long-sl2-s0"]  # best single model
    seeds = StudyPart(schedules=part.schedules, losses=part.losses, seeds=[0, 1], prune={"r": {}}, prune_seeds=[0, 1])
    # sl2 has the best single model but logit the best mean (0.445 vs 0.40): both of logit's seeds are pruned
    assert [p.name for p in models_to_prune("x", seeds, val)] == ["study-x-long-logit-s0", "study-x-long-logit-s1"]
    assert models_to_prune("x", seeds, {}) == []
    with pytest.raises(ParamsError, match=r"^prune_seeds: expected some of seeds \[0, 1\], got \[2\]"):
        StudyPart(seeds=[0, 1], prune_seeds=[2])


def test_set_arguments_are_read_back_by_dvc(tmp_path: Path) -> None:
    """The `-S` arguments through DVC's own override parser (what `dvc exp run -S` applies to params.yaml)."""
    from dvc.utils.hydra import apply_overrides as dvc_apply
    values = {"teacher.model": "yolo11s.yaml", "data.image_size": 192, "prune.target": 0.75, "student.seed": None,
              "evaluate.splits": ["val", "test"], "distill.fuse_teacher": False, "data.source": "data/sources/a.yaml"}
    args = set_arguments(values)
    assert args[::2] == ["-S"] * len(values)
    base = {"teacher": {"model": "yolo11n.yaml"}, "data": {"image_size": 256, "source": "synthetic"},
            "prune": {"target": 0.5}, "student": {"seed": 3}, "evaluate": {"splits": None},
            "distill": {"fuse_teacher": True}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))
    dvc_apply(tmp_path / "params.yaml", args[1::2])
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == apply_overrides(base, values)


def test_overrides_create_keys_and_leave_the_input_alone() -> None:
    base = {"seed": 0, "data": {"source": "synthetic", "image_size": 256}}
    out = apply_overrides(base, {"data.image_size": 192, "teacher.model": "yolo11s.yaml"})
    assert out == {"seed": 0, "data": {"source": "synthetic", "image_size": 192}, "teacher": {"model": "yolo11s.yaml"}}
    assert base["data"]["image_size"] == 256


def test_an_experiment_made_before_a_key_existed_matches_the_behaviour_it_had() -> None:
    old = {"prune": {"rounds": 5}}  # ran before params.yaml had prune.activation: SiLU kept
    assert keys_that_differ(old, {"prune.rounds": 5, "prune.activation": "keep"}) == []
    assert keys_that_differ(old, {"prune.activation": "relu"}) == ["prune.activation 'keep' -> 'relu'"]
    assert keys_that_differ(old, {"prune.rounds": 6}) == ["prune.rounds 5 -> 6"]
    assert keys_that_differ(old, {"teacher.epochs": 3}) == ["teacher.epochs None -> 3"]
    before_kpt_weight = {"distill": {"loss": "logit"}}  # logit distilled raw keypoints before the key existed
    assert keys_that_differ(before_kpt_weight, {"distill.kpt_weight": 1.0}) == []
    assert keys_that_differ(before_kpt_weight, {"distill.kpt_weight": 0}) == ["distill.kpt_weight 1.0 -> 0"]


def test_plateau_is_the_last_quarter_against_the_best_before() -> None:
    assert plateau_gain([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) == pytest.approx(0.2)  # still rising
    assert plateau_gain([0.1, 0.3, 0.40, 0.41, 0.40, 0.39, 0.404, 0.412]) == pytest.approx(0.002)
    assert plateau_gain([0.5, 0.4, 0.3, 0.2, 0.1]) < 0  # the best was earlier
    assert plateau_gain([0.1, 0.2, 0.3]) is None
    assert plateaued([0.1, 0.3, 0.40, 0.41, 0.40, 0.39, 0.404, 0.412], 0.005) is True
    assert plateaued([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 0.005) is False
    assert plateaued([0.0] * 8, 0.005) is False  # nothing learnt is not a plateau
    assert plateaued([0.1, 0.2, 0.3], 0.005) is None


def _runs() -> dict[str, dict[int, Scored]]:
    def s(seed: int, val: float, test: float, spe: float) -> Scored:
        return Scored(seed, {"val": val, "test": test, "test_shift": test - 0.1}, spe)
    return {PLAIN: {0: s(0, 0.30, 0.28, 10), 1: s(1, 0.32, 0.30, 10)},
            "sl2": {0: s(0, 0.31, 0.29, 15), 1: s(1, 0.33, 0.31, 15)},
            "logit": {0: s(0, 0.35, 0.32, 12), 1: s(1, 0.36, 0.35, 14)}}


def test_gains_are_paired_by_seed() -> None:
    rows = {r.method: r for r in method_rows(_runs())}
    assert [r.method for r in method_rows(_runs())] == [PLAIN, "sl2", "logit"]
    logit = rows["logit"]
    assert logit.scores["test"] == pytest.approx((0.335, math.sqrt(2 * 0.015 ** 2)))
    assert logit.gain_vs_plain["test"] == pytest.approx((0.045, math.sqrt(2 * 0.005 ** 2)))
    assert logit.gain_vs_reference["test"] == pytest.approx((0.035, math.sqrt(2 * 0.005 ** 2)))
    assert logit.time_ratio == pytest.approx((1.3, math.sqrt(2 * 0.1 ** 2)))
    assert rows["sl2"].gain_vs_reference is None and rows[PLAIN].gain_vs_plain == {}
    assert "met the +1.5 target" in verdict(logit, "test", 0.015)
    assert "missed the +5.0 target" in verdict(logit, "test", 0.05)
    assert "more than one std" in verdict(logit, "test", 0.015)
    assert "missed" in verdict(rows["sl2"], "test", 0.015)
    one_seed = method_rows({m: {0: r[0]} for m, r in _runs().items()})[2]
    assert "one paired seed: no std to beat" in verdict(one_seed, "test", 0.015)


def test_report_states_targets_plateaus_and_what_is_missing() -> None:
    part = StudyPart(params={"teacher.model": "yolo11s.yaml", "student.imgsz": 192}, schedules={"long": 8},
                     losses=["sl2", "logit"], seeds=[0, 1], prune={"default": {}})
    study = StudyConfig(parts={"d": part})
    runs = {m: {s: {"scores": r.scores, "seconds_per_epoch": r.seconds_per_epoch,
                    "curve": [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.301]}
                for s, r in by_seed.items()} for m, by_seed in _runs().items()}
    scores = {"val": 0.36, "test": 0.35, "test_shift": 0.25}
    got = {"schedules": {"long": {"epochs": 8, "runs": runs}}, "missing": ["study-d-long-x-s9"], "commits": ["f00d"],
           "teacher": {"scores": scores, "curve": [0.1] * 8, "gflops": 3.0, "student_gflops": 1.0},
           "best": ["study-d-long-logit-s1"],
           "prune": {"default": {1: {
               "experiment": "p", "overrides": {}, "scores": {"val": 0.355, "test": 0.345, "test_shift": 0.23},
               "metrics": {"ratio": {"gflops_removed": 0.65}, "pruned": {"rounds_done": 2, "best_round": 2}},
               "distilled": scores,
               "rounds": [{"round": 0, "gflops": 1.0, "map50_95_before": 0.36, "map50_95_after": 0.36},
                          {"round": 1, "gflops": 0.6, "map50_95_before": 0.1, "map50_95_after": 0.35},
                          {"round": 2, "gflops": 0.35, "map50_95_before": 0.2, "map50_95_after": 0.355}]}}},
           "overhead": "# Distillation time overhead\n\nsetting\n\n| method | x |\n|---|---|\n| plain | 1 |\n"}
    text, summary = format_study(study, {"d": got}, "abc123")
    assert "commit abc123" in text and "Experiments ran the code of commit f00d." in text
    assert summary["parts"]["d"]["commits"] == ["f00d"]
    assert "Teacher: 8 epochs, plateaued (last quarter gained +0.00 points)" in text
    assert "seed 0: plateaued (last quarter gained +0.10 points)" in text
    assert "| logit | 0 1 | 0.3550 ± 0.0071 | 0.3350 ± 0.0212 |" in text
    assert "- **logit**, on test: gain +4.50 points (met the +1.5 target)" in text
    # a record from before the control: lost against the distilled model it pruned (test_shift lost 2)
    assert "| default | 1 | - | 2 | 2 | 65.0% | +0.50 | +0.50 | +2.00 | distilled | **missed** |" in text
    assert "- `default`, seed 1: r1 0.100 -> 0.350 (40%), r2 0.200 -> 0.355 (65%)" in text
    assert "` over seeds" not in text  # one pruned seed: no std
    assert "| plain | 1 |" in text
    assert ("Not finished yet (rerun `python -m yolo_compress.experiments.study` to continue): "
            "study-d-long-x-s9.") in text
    assert summary["parts"]["d"]["prune"]["default"][1]["target_met"] is False
    assert summary["parts"]["d"]["teacher"]["plateaued"] is True
    assert summary["parts"]["d"]["schedules"]["long"]["plain_plateau"][0]["plateaued"] is True
    json.dumps(summary)  # the JSON twin is plain data
    second = json.loads(json.dumps(got["prune"]["default"][1]))  # seed 0 lost 1 point less on test_shift: met
    second["scores"] = {"val": 0.355, "test": 0.345, "test_shift": 0.245}
    got["prune"]["default"][0] = second
    text, summary = format_study(study, {"d": got}, "abc123")
    assert "| default | 0 | - | 2 | 2 | 65.0% | +0.50 | +0.50 | +0.50 | distilled | **met** |" in text
    with_control = json.loads(json.dumps(second))  # its control trained as long gained 1.5 points on test: missed
    with_control["control"] = {"val": 0.36, "test": 0.36, "test_shift": 0.25}
    control_text = format_study(study, {"d": {**got, "prune": {"default": {0: with_control}}}}, "abc123")[0]
    assert "| default | 0 | - | 2 | 2 | 65.0% | +0.50 | +1.50 | +0.50 | control | **missed** |" in control_text
    assert "from study.yaml at commit abc123" in text
    follow_up = format_study(study, {"d": got}, "abc123", "follow_up.yaml")[0]
    assert "from follow_up.yaml at commit" in follow_up
    assert "(rerun `python -m yolo_compress.experiments.study --config follow_up.yaml` to continue)" in follow_up
    assert ("- `default` over seeds 0 1: lost +0.50 ± 0.00 on val, +0.50 ± 0.00 on test, +1.25 ± 1.06 on "
            "test_shift; target met on 1 of 2 seeds.") in text
    got["teacher"]["curve"] = [0.0] * 8  # flat at zero is not a plateau, in the text and in the JSON
    text, summary = format_study(study, {"d": got}, "abc123")
    assert "Teacher: 8 epochs, NOT plateaued: nothing learnt yet (best val 0.0000)" in text
    assert summary["parts"]["d"]["teacher"] == {"scores": scores, "plateau_gain": 0.0, "plateaued": False}


def test_kd_recovery_pairs_each_kd_recipe_with_the_same_recipe_without_it() -> None:
    """prune.distill on against off, per seed: the pruned scores' difference, and whether KD never lost."""
    def record(distill: bool, test: float, shift: float, **extra: str) -> dict:
        return {"overrides": {"prune.rounds": 2, "prune.distill": distill, **extra},
                "scores": {"val": 0.3, "test": test, "test_shift": shift}}

    recipes = {"off": {0: record(False, 0.30, 0.20), 1: record(False, 0.32, 0.22)},
               "kd": {0: record(True, 0.31, 0.21, **{"prune.teacher": "input"}),
                      1: record(True, 0.33, 0.215, **{"prune.teacher": "input"})},
               "other": {0: {"overrides": {"prune.rounds": 3, "prune.distill": True}, "scores": {}}}}
    lines, summary = kd_recovery(recipes)
    assert summary["kd"]["against"] == "off" and summary["kd"]["seeds"] == [0, 1]
    assert summary["kd"]["never_worse"] is False  # seed 1 lost 0.5 point on test_shift
    assert "other" not in summary  # no recipe without KD shares its other overrides
    assert "| kd | off | 0 1 | +1.00 ± 0.00 (+1.00, +1.00) | +0.25 ± 1.06 (+1.00, -0.50) | **no** |" in lines


def test_a_part_is_paired_by_seed_with_the_part_it_names_against() -> None:
    """Part c (unlabeled images) against part a: the same plain students, each loss's students minus the other's."""
    def got(logit_test: dict[int, float], plain_test: float = 0.30) -> dict:
        def scored(test: float) -> dict:
            return {"scores": {"val": 0.3, "test": test, "test_shift": 0.1}, "seconds_per_epoch": 1.0}
        runs = {PLAIN: {s: {**scored(plain_test), "curve": [0.1] * 4} for s in (0, 1)},
                "logit": {s: scored(t) for s, t in logit_test.items()}}
        return {"schedules": {"long": {"epochs": 4, "runs": runs}}, "missing": []}

    a = StudyPart(schedules={"long": 4}, losses=["sl2", "logit"], seeds=[0, 1])
    c = StudyPart(schedules={"long": 4}, losses=["logit"], seeds=[0, 1], against="a")
    study = StudyConfig(parts={"a": a, "c": c})
    text, summary = format_study(study, {"a": got({0: 0.33, 1: 0.34}), "c": got({0: 0.35, 1: 0.33})}, "abc123")
    assert "### `c` against `a`" in text
    assert "| logit | logit | 0 1 | +0.00 ± 0.00 (+0.00, +0.00) | +0.50 ± 2.12 (+2.00, -1.00) |" in text
    assert "score the same on every split" in text and "| plain |" not in text.split("against `a`")[1]
    assert summary["parts"]["c"]["against"]["plain_students_equal"] is True
    # plain students trained longer (another schedule): plain against plain, and against the other's students
    text = format_study(study, {"a": got({0: 0.33}), "c": got({0: 0.35}, plain_test=0.34)}, "abc123")[0]
    assert "| logit | logit | 0 |" in text and "differ, so each part's students are also set against" in text
    assert "| plain | plain | 0 1 | +0.00 ± 0.00 (+0.00, +0.00) | +4.00 ± 0.00 (+4.00, +4.00) |" in text
    assert "| plain | logit | 0 | +0.00 ± 0.00 (+0.00) | +1.00 ± 0.00 (+1.00) |" in text
    nothing_to_pair = {"a": {"schedules": {}, "missing": []}, "c": got({0: 0.35})}
    assert "against" not in format_study(study, nothing_to_pair, "abc123")[1]["parts"]["c"]


def test_the_timing_table_is_keyed_by_what_it_timed_not_by_the_part() -> None:
    # the first study reused a 192 px timing table for the 160 px part; renaming a part used to lose its table
    same = overhead_path("data1", "teacher1", "student: {imgsz: 160}\n", ["sl2", "logit"])
    assert overhead_path("data1", "teacher1", "student: {imgsz: 160}\n", ["sl2", "logit"]) == same
    assert overhead_path("data2", "teacher1", "student: {imgsz: 160}\n", ["sl2", "logit"]) != same
    assert overhead_path("data1", "teacher2", "student: {imgsz: 160}\n", ["sl2", "logit"]) != same
    assert overhead_path("data1", "teacher1", "student: {imgsz: 192}\n", ["sl2", "logit"]) != same
    assert overhead_path("data1", "teacher1", "student: {imgsz: 160}\n", ["sl2", "logit", "mgd"]) != same


def test_a_bad_prune_recipe_is_refused_before_anything_is_queued(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    part = StudyPart(schedules={"short": 1}, prune={"ok": {"prune.finetune_epochs": 10},
                                                    "bad": {"prune.finetune_epochs": -1}})
    with pytest.raises(ParamsError, match=r"^study\.yaml: parts\.d\.prune\.bad: .*finetune_epochs"):
        check_params(StudyConfig(parts={"d": part}), ["d"])
    check_params(StudyConfig(parts={"d": StudyPart(schedules={"short": 1}, prune={"ok": {}})}), ["d"])


def test_a_start_that_is_not_there_is_refused_before_anything_runs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    part = StudyPart(schedules={"short": 1}, params={"student.model": "models/start/synthetic_yolo11n.pt"})
    with pytest.raises(ParamsError, match=r"^study\.yaml: parts\.d\.params: student\.model: "
                                          r"models/start/synthetic_yolo11n\.pt not found; make the project's "
                                          r"pretrained starts with `python -m yolo_compress\.experiments\."
                                          r"pretrain_starts`"):
        check_params(StudyConfig(parts={"d": part}), ["d"])


def test_unlabeled_images_that_are_not_there_are_refused_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    part = StudyPart(schedules={"short": 1}, params={"distill.unlabeled": "data/sources/digits_unlabeled"})
    with pytest.raises(ParamsError, match=r"^study\.yaml: parts\.d\.params: distill\.unlabeled: "
                                          r"data/sources/digits_unlabeled not found; make it with `python -m "
                                          r"yolo_compress\.experiments\.unlabeled_digits`"):
        check_params(StudyConfig(parts={"d": part}), ["d"])


def test_uncommitted_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    check_committed()
    (tmp_path / "notes.txt").write_text("not code\n")
    check_committed()
    (tmp_path / "stages" / "a.py").write_text("x = 2\n")
    with pytest.raises(UserError, match=r"^uncommitted changes in stages/a\.py: the study's experiments must come "):
        check_committed()


def test_a_record_is_reused_only_with_the_same_params_and_stage_code() -> None:
    p = plan_part("d", StudyPart(schedules={"short": 3}, losses=["logit"], seeds=[0], params={"teacher.epochs": 5}))[0]
    code = {"stages/distill.py": "a1", "distill (command)": "c1"}
    record = {"name": p.name, "params": {"teacher": {"epochs": 5}, "student": {"epochs": 3, "seed": 0},
                                         "distill": {"loss": "logit"}}, "code": dict(code)}
    assert why_stale(record, p, code) is None
    assert why_stale(record, p, {**code, "stages/distill.py": "a2"}) == (
        "its stage code or start files changed (stages/distill.py)")
    assert why_stale(record, p, {**code, "yolo_compress/train/distill.py": "b1"}) == (
        "its stage code or start files changed (yolo_compress/train/distill.py)")  # a new dependency counts too
    # a start file named by the params but not on this machine (None) cannot be checked: the record stands
    record["code"]["models/start/s.pt"] = "h1"
    assert why_stale(record, p, {**code, "models/start/s.pt": None}) is None
    assert why_stale(record, p, {**code, "models/start/s.pt": "h2"}) == (
        "its stage code or start files changed (models/start/s.pt)")
    record["params"]["teacher"]["epochs"] = 4
    assert why_stale(record, p, code) == "its params differ (teacher.epochs 4 -> 5)"


def test_unreadable_records_are_skipped_so_their_experiments_run_again(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"name": "study-a", "seconds": 3}))
    (tmp_path / "b.json").write_text("{half written")
    (tmp_path / "c.json").write_text(json.dumps({"no": "name"}))
    assert list(load_records(tmp_path)) == ["study-a"]


def test_an_experiment_is_estimated_from_its_part_records_or_else_its_epochs(tmp_path: Path) -> None:
    part = StudyPart(schedules={"short": 10, "long": 40}, losses=["logit"], seeds=[0],
                     params={"data.train_images": 200, "student.imgsz": 128},
                     prune={"r": {"prune.rounds": 3, "prune.finetune_epochs": 2, "prune.last_round_epochs": 10}})
    short, long = plan_part("d", part)
    params = {"teacher": {"epochs": 20}, "student": {"imgsz": 256}, "data": {"train_images": 400},
              "prune": {"rounds": 4, "finetune_epochs": 3, "last_round_epochs": None}}
    assert planned_epochs(short.overrides, params, "distill") == 20 + 2 * 10
    prune = plan_prune("d", part, long)[0]
    # the rounds' fine-tunes, then the control's as long
    assert planned_epochs(prune.overrides, params, "prune") == 20 + 2 * 40 + 2 * (2 * 2 + 10)
    assert planned_epochs({}, params, "prune") == 20 + 0 + 2 * (3 * 3 + 3)  # last_round_epochs null: finetune_epochs
    # no record: 40 epochs of 200 images at a quarter of 256 px's area
    assert estimate_seconds(short, [], params) == pytest.approx(40 * 200 * 0.045 / 4)
    records = [{"part": "d", "target": "distill", "schedule": "short", "seconds": 600.0},
               {"part": "d", "target": "distill", "schedule": "short", "seconds": 90.0},
               {"part": "d", "target": "distill", "schedule": "long", "seconds": 5000.0},
               {"part": "other", "target": "distill", "schedule": "short", "seconds": 9000.0}]
    # no teacher of theirs in the DVC cache: the slowest like it (it trained the teacher too)
    assert estimate_seconds(short, records, params, tmp_path) == 600.0


def test_a_distill_experiment_with_its_teacher_cached_is_estimated_from_the_fastest_like_it(tmp_path: Path) -> None:
    part = StudyPart(schedules={"cap": 300}, losses=["sl2", "logit"], seeds=[0, 1])
    sl2_s0, logit_s0, sl2_s1, logit_s1 = plan_part("d", part)
    md5 = "f4cbb389966b384a9ad270384e3abef1"
    first = {"part": "d", "target": "distill", "schedule": "cap", "seed": 0, "teacher_md5": md5,
             "seconds": 4260.0, "seconds_per_epoch": {"student": 3.2, "distilled": 4.8}}  # teacher + plain + sl2
    second = {**first, "seconds": 1440.0}  # logit, seed 0: teacher and plain student from the run cache
    assert estimate_seconds(logit_s0, [first], {}, tmp_path) == 4260.0  # the teacher is not in this cache
    (tmp_path / md5[:2]).mkdir()
    (tmp_path / md5[:2] / md5[2:]).write_bytes(b"teacher")
    assert estimate_seconds(logit_s0, [first], {}, tmp_path) == 4260.0  # capped by the slowest like it
    assert estimate_seconds(logit_s1, [first, second], {}, tmp_path) == pytest.approx(1.1 * (1440 + 300 * 3.2))
    assert estimate_seconds(sl2_s0, [first, second], {}, tmp_path) == pytest.approx(1.1 * 1440)  # seed 0's plain
    old = {k: v for k, v in second.items() if k != "seconds_per_epoch"}
    assert estimate_seconds(sl2_s1, [first, old], {}, tmp_path) == 4260.0  # no per-epoch time: the slowest


@pytest.mark.e2e
def test_study_records_each_experiment_and_resumes_from_records(tiny_repo: tuple[Path, dict[str, str]],
                                                                tmp_path: Path) -> None:
    repo = copy_repo(tiny_repo[0], tmp_path / "repo")
    env = tiny_repo[1]
    (repo / "study.yaml").write_text(yaml.safe_dump({"parts": {"tiny": {
        "params": {"teacher.epochs": 2}, "schedules": {"short": 1}, "losses": ["logit"], "seeds": [1],
        "prune": {"default": {}}}}}))
    run([*GIT, "add", "study.yaml"], repo, env)
    run([*GIT, "commit", "-qm", "tiny study"], repo, env)
    head = run([*GIT, "rev-parse", "--short", "HEAD"], repo, env).stdout.strip()
    run(["python", "-m", "yolo_compress.experiments.study"], repo, env)
    text = (repo / "reports" / "study.md").read_text()
    assert "### Schedule `short`: 1 student epochs" in text
    assert "| plain | 1 |" in text and "| logit | 1 |" in text
    assert "### Pruning `study-tiny-short-logit-s1`" in text and "| default | 1 | - | " in text
    assert "### Distillation time, side by side" in text and "Not finished" not in text
    assert f"Experiments ran the code of commit {head}." in text  # the experiments' baseline, not a record commit
    summary = json.loads((repo / "reports" / "study.json").read_text())
    for row in summary["parts"]["tiny"]["schedules"]["short"]["rows"]:
        assert all(0 <= row["scores"][s][0] <= 1 for s in ("val", "test", "test_shift"))
    names = ["study-tiny-short-logit-s1", "study-tiny-short-pruned_default-logit-s1"]
    # each record (and the timing table) was committed as it was made, and nothing else
    log = run([*GIT, "log", "--format=%s", f"{head}..HEAD"], repo, env).stdout.splitlines()
    assert log == ["study: distillation timing of part tiny", *(f"study: record of {n}" for n in reversed(names))]
    assert run([*GIT, "status", "--porcelain", "--", "reports/study_records"], repo, env).stdout == ""
    record = json.loads((repo / "reports" / "study_records" / f"{names[0]}.json").read_text())
    assert record["commit"] == head and record["params"]["student"]["seed"] == 1
    assert set(record["scores"]) == {"teacher", "student", "distilled"} and len(record["curves"]["teacher"]) == 2
    assert "stages/distill.py" in record["code"] and "stages/evaluate.py" not in record["code"]

    # a new machine: no experiment refs, no DVC cache, no score cache; the committed records are enough
    for name in names:
        run(["dvc", "exp", "remove", name], repo, env)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / ".study")
    run(["python", "-m", "yolo_compress.experiments.study", "--collect-only"], repo, env)
    assert (repo / "reports" / "study.md").read_text().split("\n", 3)[3] == text.split("\n", 3)[3]
    proc = run(["python", "-m", "yolo_compress.experiments.study"], repo, env)  # resumed: nothing to run
    assert "running study-" not in proc.stderr
    assert run(["dvc", "exp", "list", "--all-commits", "--name-only"], repo, env).stdout.split() == []

    # code that only evaluate uses keeps the records; the distill stage's code makes them stale
    with (repo / "stages" / "evaluate.py").open("a") as f:
        f.write("# an edit\n")
    run([*GIT, "commit", "-qam", "evaluate edit"], repo, env)
    run(["python", "-m", "yolo_compress.experiments.study", "--collect-only"], repo, env)
    assert "Not finished" not in (repo / "reports" / "study.md").read_text()
    with (repo / "stages" / "distill.py").open("a") as f:
        f.write("# an edit\n")
    run([*GIT, "commit", "-qam", "distill edit"], repo, env)
    proc = run(["python", "-m", "yolo_compress.experiments.study", "--budget", "0.001"], repo, env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert any(line.endswith(f"{names[0]}: its record is not reused, its stage code or start files changed "
                             "(stages/distill.py): it runs again") for line in lines)
    assert lines[-1].startswith(f"error: --budget 0.001 min is too small for one experiment: {names[0]} needs about ")
    assert run(["dvc", "exp", "list", "--all-commits", "--name-only"], repo, env).stdout.split() == []
