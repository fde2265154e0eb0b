# Shared by the rule files (the stage command, path helpers over sophon.layout, what each experiment runs).
# Commands are `python -m stages.<stage> --params <file> --experiment <name> ...`, exactly as in dvc.yaml;
# stderr (progress bars, logging) goes to the rule's log.
from sophon.tasks import get_task

# One software environment for every rule (used with --software-deployment-method conda); the container image
# for clusters is built from the Containerfile at the top level.
CONDA_ENV = os.path.join(workflow.basedir, "environment.yml")

def stage(name, extra=""):
    """The shell command of a stage's jobs (the experiment and log filled in by Snakemake)."""
    command = f"python -m stages.{name} --params {PARAMS_FILE} --experiment {{wildcards.experiment}}"
    return f"{command} {extra} 2> {{log}}" if extra else f"{command} 2> {{log}}"


def job(stage_name, key):
    """What a stage's jobs ask for (params.yaml `jobs`, defaults from the schema): the stage's entry over `default`."""
    return {**config["jobs"]["default"], **config["jobs"].get(stage_name, {})}[key]


def resources(stage_name):
    """Resources of a stage's jobs: memory and runtime for a scheduler, GPUs only when asked for."""
    found = {"mem_mb": job(stage_name, "mem_mb"), "runtime": job(stage_name, "runtime")}
    if job(stage_name, "gpus"):
        found["gpu"] = job(stage_name, "gpus")
    return found


def exp(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def task(name):
    return get_task(EXPERIMENTS[name]["task"])


def split_inputs(name, *parts):
    return [*(str(layout.split_part(name, part)) for part in parts), str(layout.split_manifest(name))]


def model_inputs(name, model):
    return [str(path) for path in layout.model_files(name, model)]


def parts_of(*parts):
    """An input function: these split parts of the job's experiment."""
    return lambda wildcards: split_inputs(wildcards.experiment, *parts)


def original_model(wildcards):
    return model_inputs(wildcards.experiment, "original")


def imported_checkpoint(wildcards):
    """The model the pretrain stage imports (original.checkpoint: a file or a diffusers folder), if one is set."""
    path = exp(wildcards)["original"].get("checkpoint")
    if not path:
        return []
    # A model another experiment of this config released: the job depends on that release folder (a directory
    # output), so Snakemake makes it first.
    for name in EXPERIMENTS:
        for model in ("original", "sophon"):
            folder = str(layout.release_dir(name, model))
            if os.path.normpath(path).startswith(folder + os.sep):
                return [folder]
    return [path]


def without_checkpoint(section):
    return {k: v for k, v in section.items() if k != "checkpoint"} if isinstance(section, dict) else section


# --- attack, sweep, stability -------------------------------------------------------------------------------

def attack_inputs(wildcards):
    name = wildcards.experiment
    model = [] if wildcards.start == "scratch" else model_inputs(name, wildcards.start)
    sweep = [str(layout.sweep_dir(name))] if "sweep" in EXPERIMENTS[name] else []
    return [*split_inputs(name, "adversary", "restricted_test"), *model, *sweep]


# --- search --------------------------------------------------------------------------------------------------

def search_starts(name):
    """Training from scratch is always searched, beside the configured models."""
    return ["scratch", *EXPERIMENTS[name]["search"]["starts"]]


def search_outputs(name):
    return [str(layout.search_result(name, start)) for start in search_starts(name)]


def search_inputs(wildcards):
    model = [] if wildcards.start == "scratch" else model_inputs(wildcards.experiment, wildcards.start)
    return [*split_inputs(wildcards.experiment, "adversary", "restricted_test"), *model]


def redteam_outputs(name):
    suite = EXPERIMENTS[name]["redteam"]
    return [str(layout.redteam_result(name, start)) for start in suite["starts"]] if suite["attacks"] else []


# --- report --------------------------------------------------------------------------------------------------

def report_outputs(name):
    folder = layout.report_dir(name)
    experiment = EXPERIMENTS[name]
    return [*(str(folder / f) for f in ("summary.json", "report.md", "report.html")),
            *(str(folder / f"{figure}.png") for figure in layout.REPORT_FIGURES[experiment["task"]]),
            *(str(folder / "curves" / f"{attack}.csv") for attack in experiment["attacks"])]


def report_inputs(name):
    experiment, starts = EXPERIMENTS[name], task(name).starts
    inputs = {
        "curves": [str(layout.attack_dir(name, s)) for s in starts],
        "histories": [str(layout.history(name, m)) for m in task(name).models()],
        "cards": [str(layout.model_dir(name, m) / layout.CARD) for m in task(name).models()],
        "search": search_outputs(name),
        "redteam": redteam_outputs(name),
        "sweep": [str(layout.sweep_dir(name))] if "sweep" in experiment else [],
        "stability": [str(layout.stability_dir(name))] if "stability" in experiment else [],
    }
    if experiment["task"] == "diffusion":
        # The denoising figures load the models and test parts. ancient(): DVC rewrites cached files with new
        # mtimes; a retrained model reaches the report through the attack curves anyway.
        inputs["models"] = [ancient(p) for m in task(name).models() for p in model_inputs(name, m)]
        inputs["parts"] = [ancient(p) for p in split_inputs(name, "original_test", "restricted_test")]
    else:
        # The verdict names failing epochs at the restricted test set's majority-class share (chance level).
        inputs["parts"] = [ancient(p) for p in split_inputs(name, "restricted_test")]
    return inputs
