"""The cluster-generic profile for real: jobs go through its submit script (which runs them on this machine), with
the threads and resources of params.yaml `jobs`; the SLURM profile names an installed executor."""

import csv

import yaml

from tests.pipeline_helpers import bin_path, copy_project, run, tiny_params

CLS = "quick-classification"


def test_jobs_go_through_the_submit_script_with_their_resources(tmp_path):
    root = copy_project(tmp_path)
    params = tiny_params(root / "params.yaml")
    params["jobs"] = {"default": {"threads": 1, "mem_mb": 1234, "runtime": 7, "gpus": 0}, "pretrain": {"runtime": 9}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    target = f"models/{CLS}/original/model.json"
    # Status rounds every second, not the default 10 s: the two jobs take seconds.
    run([bin_path("snakemake"), "--profile", "profiles/cluster-generic", "--seconds-between-status-checks", "1", target],
        root)
    assert (root / target).exists()
    with open(root / ".snakemake" / "local-submit" / "submitted.tsv") as handle:
        submitted = [row for row in csv.reader(handle, delimiter="\t")]
    # split, then pretrain: each submitted once, with its threads, memory and runtime (pretrain's own runtime).
    assert [row[1:4] for row in submitted] == [["1", "1234", "7"], ["1", "1234", "9"]], submitted
    assert all(row[4].endswith(".sh") for row in submitted)


def test_slurm_profile_plans_the_paper_jobs_with_gpus(tmp_path):
    """A dry run through the SLURM executor plugin: the paper profile's jobs carry its threads, memory, runtime and
    GPU requests (nothing is submitted)."""
    root = copy_project(tmp_path)
    out = run([bin_path("snakemake"), "--profile", "profiles/slurm", "--configfile", "configs/paper.yaml", "-n"],
              root).stdout
    resources = {}
    for block in out.split("\nrule ")[1:]:
        line = next(row for row in block.splitlines() if row.strip().startswith("resources:"))
        resources.setdefault(block.split(":")[0], line)
    assert "gpu=1" in resources["protect"] and "runtime=2880" in resources["protect"], resources["protect"]
    assert "mem_mb=32000" in resources["search"] and "gpu=1" in resources["search"]
    assert "gpu=" not in resources["split"] and "runtime=60" in resources["split"]
