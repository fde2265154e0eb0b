"""Snakemake and DVC describe the same DAG: the same commands, data dependencies and outputs."""

from pathlib import Path

import pytest

from tests.pipeline_helpers import copy_project, snakemake_dry_run

CODE_DIRS = ("sophon", "stages")


def covers(paths: set[str], path: str) -> bool:
    """A DVC path (file or folder) covers a Snakemake file when it is that file or a folder above it."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in paths)


def dvc_stages(root: Path) -> dict[str, dict]:
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = {}
        for stage in repo.index.stages:
            deps = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
            params = [key for d in stage.deps if isinstance(d, ParamsDependency) for key in d.params]
            stages[stage.cmd] = {"name": stage.addressing, "outs": {o.def_path for o in stage.outs},
                                 "data_deps": {d for d in deps if not d.startswith(CODE_DIRS)},
                                 "code_deps": {d for d in deps if d.startswith(CODE_DIRS)}, "params": params}
        return stages


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp("agree"))
    jobs = [job for job in snakemake_dry_run(root, "--forceall", "all", "ablation") if job["cmd"]]
    return {job["cmd"]: job for job in jobs}, dvc_stages(root), root


def test_same_commands(both):
    snake, dvc, _ = both
    assert set(snake) == set(dvc), (sorted(set(snake) - set(dvc)), sorted(set(dvc) - set(snake)))


def test_same_outputs_and_data_dependencies(both):
    snake, dvc, _ = both
    for cmd, stage in dvc.items():
        job = snake[cmd]
        assert all(covers(stage["outs"], out) for out in job["output"]), (stage["name"], job["output"], stage["outs"])
        assert all(any(covers({out}, o) for o in job["output"]) for out in stage["outs"]), (stage["name"], stage["outs"])
        inputs = [i for i in job["input"] if not i.startswith(".snakemake/")]  # the dvc.lock stamp (state.smk)
        assert all(covers(stage["data_deps"], dep) for dep in inputs), (stage["name"], job["input"])
        assert all(any(covers({dep}, i) for i in inputs) for dep in stage["data_deps"]), (stage["name"], stage["data_deps"])


def test_dvc_code_dependencies_exist_and_params_are_per_key(both):
    _, dvc, root = both
    for stage in dvc.values():
        assert stage["code_deps"], f"{stage['name']} lists none of the code it runs"
        for dep in stage["code_deps"]:
            assert (root / dep).exists(), f"{stage['name']}: {dep} does not exist"
        assert stage["params"], f"{stage['name']} tracks no params"


def test_each_job_reads_the_dvc_lock_state_of_its_own_stage(both):
    """The stamp through which Snakemake follows dvc.lock (workflow/rules/state.smk) is named after the job's stage."""
    snake, dvc, _ = both
    for cmd, stage in dvc.items():
        stamps = [i for i in snake[cmd]["input"] if i.startswith(".snakemake/dvc-state/")]
        assert stamps == [f".snakemake/dvc-state/{stage['name'].split(':')[-1]}"], (stage["name"], stamps)


def test_several_targets_plan_on_a_fresh_clone(tmp_path):
    """Each job's stamp is written while Snakemake builds the DAG, after it may have listed the stamp folder (its file
    cache lists a folder once): a stamp missing from that listing must not read as a missing input."""
    root = copy_project(tmp_path)
    targets = ["results/quick-classification/search/scratch.json", "results/quick-classification/search/original.json",
               "models/quick-classification/sophon/model.safetensors"]
    rules = sorted(job["rule"] for job in snakemake_dry_run(root, *targets))
    assert rules == ["pretrain", "protect", "search", "search", "split"]
