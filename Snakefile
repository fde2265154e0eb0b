# Entry point only: config, validation, the rule files and `all`.
#   snakemake --cores 2                                          # the quick profile (params.yaml)
#   snakemake --cores 16 --configfile profiles/paper/params.yaml  # the paper profile
import os
import sys
import uuid

sys.path.insert(0, workflow.basedir)

from sophon import layout
from sophon.config import validate_params

configfile: "params.yaml"

# Stages read the same file Snakemake was given, so both see one validated config.
PARAMS_FILE = os.path.relpath(workflow.overwrite_configfiles[-1]) if workflow.overwrite_configfiles else "params.yaml"
config.update(validate_params(config, source=PARAMS_FILE))
# One tag groups the MLflow runs of this invocation; jobs inherit it through the environment.
os.environ.setdefault("SOPHON_INVOCATION", uuid.uuid4().hex[:12])


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/attack.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/generation.smk"


rule all:
    default_target: True
    input:
        report_outputs(),
        gen_report_outputs(),


rule gen_all:
    input:
        gen_report_outputs(),


onstart:
    from sophon.tracking import init_store

    init_store(config["experiment"])  # once, before parallel jobs race to create the SQLite store
    init_store(config["generation"]["experiment"])
