# The attack search (stages.search): one job per experiment and start, both tasks alike.


def search_starts(name):
    """Training from scratch is always searched, beside the configured models."""
    return ["scratch", *EXPERIMENTS[name]["search"]["starts"]]


def search_outputs(name):
    return [str(layout.search_result(name, start)) for start in search_starts(name)]


def search_inputs(wildcards):
    model = [] if wildcards.start == "scratch" else model_inputs(wildcards.experiment, wildcards.start)
    return split_inputs(wildcards.experiment, "adversary", "restricted_test") + model


rule search:
    input:
        search_inputs,
    output:
        str(layout.search_result("{experiment}", "{start}")),
    params:
        search=lambda w: exp(w)["search"],
        model=lambda w: (exp(w).get("model") or exp(w).get("unet")) if w.start == "scratch" else None,
    log:
        str(layout.log("{experiment}", "search/{start}")),
    threads: 1
    priority: 5  # the longest jobs after protect: start them before the short attack jobs
    shell:
        stage("search", "--start {wildcards.start}")
