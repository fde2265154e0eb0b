"""MLflow runs end as what happened to their job: KILLED after SIGTERM, and KILLED on the next start after SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", str(PROJECT))
    from sophon.tracking import init_store

    init_store("killed")  # the store exists before the child processes, as under Snakemake's onstart
    return tmp_path


def _child(code: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _status(run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient().get_run(run_id).info.status


def test_sigkilled_job_run_is_marked_killed_on_the_next_start(store):
    child = _child("""
        import os, signal
        from sophon.tracking import stage_run
        with stage_run("protect", "killed", params={"loops": 3}) as tracked:
            print(tracked.run.info.run_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """, store)
    out, _ = child.communicate(timeout=120)
    run_id = out.split()[0]
    assert child.returncode == -signal.SIGKILL and _status(run_id) == "RUNNING"
    from sophon.tracking import init_store

    init_store("killed")  # what every stage and the Snakefile's onstart call first
    assert _status(run_id) == "KILLED"


def test_sigterm_ends_the_run_killed_and_the_stage_with_130(store):
    child = _child("""
        import time
        from sophon.tracking import stage_run
        from stages.common import run

        def main():
            with stage_run("protect", "killed", params={"loops": 3}) as tracked:
                print(tracked.run.info.run_id, flush=True)
                time.sleep(120)

        run(main)
        """, store)
    run_id = child.stdout.readline().split()[0]
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130 and "interrupted by SIGTERM" in err
    assert _status(run_id) == "KILLED"


def test_a_live_run_is_left_running(store):
    from mlflow import MlflowClient

    from sophon.tracking import end_orphaned_runs, init_store, stage_run

    with stage_run("protect", "killed", params={}) as tracked:  # this process: alive
        assert end_orphaned_runs(init_store("killed")) == []
        assert MlflowClient().get_run(tracked.run.info.run_id).info.status == "RUNNING"
    assert _status(tracked.run.info.run_id) == "FINISHED"


def test_experiments_are_model_training_experiments(store):
    import mlflow

    assert mlflow.get_experiment_by_name("killed").tags["mlflow.experimentKind"] == "custom_model_development"


def test_split_parts_read_are_logged_as_run_inputs(store):
    from mlflow import MlflowClient

    from sophon import tracking

    part = store / "data" / "exp" / "adversary.safetensors"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x")
    tracking.note_input("adversary", part, "ab" * 32, 1000)
    try:
        with tracking.stage_run("attack", "killed", params={}) as tracked:
            run_id = tracked.run.info.run_id
    finally:
        tracking._INPUTS.clear()
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("exp/adversary", "ab" * 8)]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "adversary"


def test_local_store_keeps_artifacts_in_mlartifacts(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI the experiment's artifacts go to mlartifacts/ beside the store (what `make
    clean` removes and the README says), even though MLflow exports the variable once the store is set."""
    import mlflow

    from sophon.tracking import ARTIFACT_DIR, init_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    experiment_id = init_store("local")
    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (tmp_path.resolve() / ARTIFACT_DIR).as_uri(), location


def test_runs_are_tagged_with_what_decides_their_rounding(store):
    import torch
    from mlflow import MlflowClient

    from sophon import tracking

    with tracking.stage_run("attack", "killed", params={}) as tracked:
        run_id = tracked.run.info.run_id
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["sophon.torch"] == torch.__version__
    assert tags["sophon.cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_stages_started_at_once_on_a_fresh_project_share_one_local_store(tmp_path):
    """Without Snakemake's onstart (stages run by hand, side by side), the first stages would all create the SQLite
    store's schema at once, and all but one fail in its migration."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(PROJECT)
    code = "from sophon.tracking import init_store; print(init_store('race'))"
    children = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0, 0], [err[-2000:] for _, err in outs]
    assert len({out.split()[-1] for out, _ in outs}) == 1
