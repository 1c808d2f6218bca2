"""Team setups, with the real tools on loopback: an `mlflow server`, a local-folder DVC remote, a parallel queue."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from yolo_compress.experiments.compare_distill import PENDING, parse_exp_show, queue_status

from .tiny_pipeline import GIT, copy_repo, run

pytestmark = pytest.mark.e2e


def test_whole_pipeline_logs_to_a_shared_mlflow_server(tiny_repo: tuple[Path, dict[str, str]], tmp_path: Path,
                                                        mlflow_server: str) -> None:
    root, env = copy_repo(tiny_repo[0], tmp_path / "repo"), tiny_repo[1]
    local = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    local_exp = local.get_experiment_by_name("yolo-compress").experiment_id
    local_runs = len(local.search_runs([local_exp]))

    # three stages, not all nine: every stage logs through the same tracking code, which test_pipeline_e2e checks
    # stage by stage on the local store; this checks the server's side (runs, artifacts, the parent across stages)
    shared = ("prepare", "train_student", "report")
    run(["dvc", "repro", "--force", "--single-item", *shared], root, {**env, "MLFLOW_TRACKING_URI": mlflow_server})

    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("yolo-compress").experiment_id])
    stages = {r.data.tags["dvc.stage"]: r for r in runs if r.data.tags.get("kind") == "stage"}
    assert set(stages) == set(shared)
    assert len({r.data.tags["mlflow.parentRunId"] for r in stages.values()}) == 1
    student = stages["train_student"]
    assert json.loads((root / "metrics/student.json").read_text())["mlflow_run_id"] == student.info.run_id
    assert {a.path for a in client.list_artifacts(student.info.run_id)} >= {"student.json", "plots"}
    parent = student.data.tags["mlflow.parentRunId"]
    assert any(a.path.endswith("summary.md") for a in client.list_artifacts(parent, "report"))
    assert len(local.search_runs([local_exp])) == local_runs  # nothing went to the repo's own SQLite file


def test_local_remote_push_clone_pull_and_metrics_diff(tiny_repo: tuple[Path, dict[str, str]],
                                                      tmp_path: Path) -> None:
    root, env = copy_repo(tiny_repo[0], tmp_path / "repo"), tiny_repo[1]
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], root, env)
    run([*GIT, "commit", "-qam", "the team remote"], root, env)
    tracked = run(["git", "ls-files", "data", "models"], root, env).stdout.split()
    # models and data: DVC only (git keeps the folder markers and the READMEs of data/sources/ and models/start/)
    assert all(Path(f).name in (".gitignore", ".gitkeep", "README.md") for f in tracked), tracked
    run(["dvc", "push"], root, env)

    t0 = time.perf_counter()
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    status = run(["dvc", "status"], clone, env).stdout
    print(f"git clone -> dvc pull -> dvc status: {time.perf_counter() - t0:.1f} s")
    assert "Data and pipelines are up to date" in status
    assert (clone / "models/pruned.pt").stat().st_size == (root / "models/pruned.pt").stat().st_size
    assert run(["dvc", "metrics", "diff", "main"], clone, env).stdout.strip() == ""

    # a reviewer's change in the clone shows up key by key against main: dropping a split removes its keys only
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["evaluate"]["splits"] = ["val", "test"]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "evaluate"], clone, env)
    changed = json.loads(run(["dvc", "metrics", "diff", "main", "--json"], clone, env).stdout)[
        "metrics/evaluate/student.json"]
    assert isinstance(changed["test_shift.map50_95"]["old"], float) and changed["test_shift.map50_95"]["new"] is None
    assert not any(k.startswith(("val.", "test.")) for k in changed)  # scoring is deterministic


def wait_for_queue(root: Path, env: dict[str, str], names: list[str], timeout_s: float = 900) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = queue_status(root)[0]
        if not any(states.get(n) in PENDING for n in names):
            return states
        if time.monotonic() > deadline:
            pytest.fail(f"queue still busy after {timeout_s} s: {states}")
        time.sleep(2)


def test_two_parallel_queued_experiments_lose_no_runs(tiny_repo: tuple[Path, dict[str, str]],
                                                      tmp_path: Path) -> None:
    root, env = copy_repo(tiny_repo[0], tmp_path / "repo"), tiny_repo[1]
    (root / "mlflow.db").unlink()  # both workers find no store: the first-creation race must not corrupt it
    (root / "untracked_teacher.pt").write_bytes((root / "models/teacher.pt").read_bytes())

    names = ["seed1", "seed2", "untracked-teacher"]
    for name, override in zip(names, ("student.seed=1", "student.seed=2", "distill.teacher=untracked_teacher.pt"),
                              strict=True):
        run(["dvc", "exp", "run", "--queue", "--name", name, "-S", override, "distill"], root, env)
    run(["dvc", "queue", "start", "-j", "2"], root, env)
    states = wait_for_queue(root, env, names)
    assert [states.get(n) for n in names] == ["Success", "Success", "Failed"], states

    records, _ = parse_exp_show(json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout))
    assert {(r.name, r.seed) for r in records} >= {(names[0], 1), (names[1], 2)}  # both metrics sets arrived
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("yolo-compress").experiment_id])
    for name, seed in zip(names[:2], (1, 2), strict=True):
        mine = {r.data.tags["dvc.stage"]: r for r in runs
                if r.data.tags.get("dvc.exp_name") == name and r.data.tags.get("kind") == "stage"}
        assert set(mine) == {"train_student", "distill"}, (name, sorted(mine))
        assert mine["distill"].data.params["seed"] == str(seed)
        assert "best.map50_95" in mine["distill"].data.metrics
    # the experiment that needed an untracked file says why, in one line
    log = run(["dvc", "queue", "logs", names[2]], root, env).stdout
    assert "untracked_teacher.pt" in log and "sees only files tracked by git or DVC" in log
