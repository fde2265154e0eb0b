# The attack search (stages.search): one job per experiment and start, both tasks alike.


rule search:
    input:
        search_inputs,
        state=dvc_state("search", lambda w: {
            "search": exp(w)["search"],
            "model": (exp(w).get("model") or exp(w).get("unet")) if w.start == "scratch" else None}),
    output:
        str(layout.search_result("{experiment}", "{start}")),
    log:
        str(layout.log("{experiment}", "search/{start}")),
    conda:
        CONDA_ENV
    threads: job("search", "threads")
    resources:
        **resources("search"),
    priority: 5  # the longest jobs after protect: start them before the short attack jobs
    shell:
        stage("search", "--start {wildcards.start}")


# The red-team suite (stages.redteam): one job per experiment and attacked start.
rule redteam:
    input:
        search_inputs,
        state=dvc_state("redteam", lambda w: exp(w)["redteam"]),
    output:
        str(layout.redteam_result("{experiment}", "{start}")),
    log:
        str(layout.log("{experiment}", "redteam/{start}")),
    conda:
        CONDA_ENV
    threads: job("redteam", "threads")
    resources:
        **resources("redteam"),
    shell:
        stage("redteam", "--start {wildcards.start}")
