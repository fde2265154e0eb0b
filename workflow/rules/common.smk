# Shared by the rule files: the stage command, path helpers over sophon.layout, and what each experiment runs.
# Commands are `python -m stages.<stage> --params <file> --experiment <name> ...`, exactly as in dvc.yaml;
# stderr (progress bars, logging) goes to the rule's log.
from sophon.tasks import get_task

STAGE = "python -m stages.{stage} --params " + PARAMS_FILE + " --experiment {{wildcards.experiment}}"


def stage(name, extra=""):
    return STAGE.format(stage=name) + (" " + extra if extra else "") + " 2> {log}"


def exp(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def task(name):
    return get_task(EXPERIMENTS[name]["task"])


def split_inputs(name, *parts):
    return [str(layout.split_part(name, part)) for part in parts] + [str(layout.split_manifest(name))]


def model_inputs(name, model):
    return [str(path) for path in layout.model_files(name, model)]


def parts_of(*parts):
    """An input function: these split parts of the job's experiment."""
    return lambda wildcards: split_inputs(wildcards.experiment, *parts)


def original_model(wildcards):
    return model_inputs(wildcards.experiment, "original")


wildcard_constraints:
    experiment="|".join(EXPERIMENTS),
    start="|".join(layout.STARTS),
