# The attack search (stages.search): one job per experiment and start, both tasks alike.

SEARCH = {"classification": config["search"], "generation": config["generation"]["search"]}


def search_outputs(experiment):
    return [str(layout.search_result(experiment, start)) for start in search_starts(experiment)]


def search_starts(experiment):
    """Training from scratch is always searched, beside the configured models."""
    return ["scratch", *SEARCH[experiment]["starts"]]


def search_inputs(wildcards):
    if wildcards.experiment == "classification":
        model = [] if wildcards.start == "scratch" else model_inputs(wildcards.start)
        return split_inputs("adversary", "restricted_test") + model
    model = [] if wildcards.start == "scratch" else gen_model_inputs(wildcards.start)
    return gen_split_inputs("adversary", "restricted_test") + model


rule search:
    input:
        search_inputs,
    output:
        str(layout.search_result("{experiment}", "{start}")),
    params:
        search=lambda wildcards: SEARCH[wildcards.experiment],
    wildcard_constraints:
        experiment="classification|generation",
    log:
        "logs/search/{experiment}/{start}.log",
    threads: 1
    shell:
        STAGE.format(stage="search") + " --experiment {wildcards.experiment} --start {wildcards.start} 2> {log}"
