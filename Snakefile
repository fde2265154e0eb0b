# Entry point only: config, validation, the rule files and `all`.
#   snakemake --cores 2                                  # every experiment of params.yaml (the quick profile)
#   snakemake --cores 16 --configfile configs/paper.yaml  # the paper profile instead
import os
import sys
import uuid

sys.path.insert(0, workflow.basedir)

from sophon import layout
from sophon.config import load_params

configfile: "params.yaml"

# Stages read the same file Snakemake was given, so both see one validated config. A --configfile replaces
# params.yaml (Snakemake would merge the two experiment maps otherwise).
PARAMS_FILE = os.path.relpath(workflow.overwrite_configfiles[-1]) if workflow.overwrite_configfiles else "params.yaml"
config.clear()
config.update(load_params(PARAMS_FILE, checked=".snakemake/sophon-checked"))
EXPERIMENTS = config["experiments"]
# One tag groups the MLflow runs of this invocation; jobs inherit it through the environment.
os.environ.setdefault("SOPHON_INVOCATION", uuid.uuid4().hex[:12])


include: "workflow/rules/common.smk"
include: "workflow/rules/state.smk"


wildcard_constraints:
    experiment="|".join(EXPERIMENTS),
    start="|".join(layout.STARTS),
    variant="[a-z][a-z0-9_]*",


include: "workflow/rules/train.smk"
include: "workflow/rules/attack.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/ablation.smk"


rule all:
    default_target: True
    input:
        [path for name in EXPERIMENTS for path in report_outputs(name)],


onstart:
    from sophon.tracking import init_store

    for name in EXPERIMENTS:  # once, before parallel jobs race to create the SQLite store
        init_store(name)


onsuccess:
    # After every job has finished, in this process (never inside a job): dvc.lock records what ran.
    commit_to_dvc(workflow.dag.jobs)
