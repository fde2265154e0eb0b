# Shared by the rule files. Commands are `python -m stages.<stage> --params <file> ...`, exactly as in dvc.yaml;
# stderr (progress bars, logging) goes to the rule's log.

STAGE = "python -m stages.{stage} --params " + PARAMS_FILE
SPLIT_FILES = [str(layout.split_part(part)) for part in layout.SPLIT_PARTS] + [str(layout.split_manifest())]


def split_inputs(*parts):
    return [str(layout.split_part(part)) for part in parts] + [str(layout.split_manifest())]


def model_inputs(name):
    return [str(path) for path in layout.model_files(name)]


def all_threads():
    return workflow.cores


wildcard_constraints:
    start="|".join(layout.STARTS),
    attack="|".join(config["attacks"]),
    seed=r"\d+",
    lr=r"[0-9.eE+-]+",
