# The ablation of the protect stage's settings (stages.ablation): outside `all`, run with `snakemake ablation`.
# One job per experiment and variant (protect, then the Sophon start's attack search), then one table each.


rule ablation_variant:
    input:
        parts_of("original_train", "original_val", "original_test", "defender", "adversary", "restricted_test"),
        original_model,
        str(layout.search_result("{experiment}", "scratch")),
        state=dvc_state("ablation_variant", lambda w: {
            "variant": exp(w)["ablation"]["variants"][w.variant], "sophon": exp(w)["sophon"], "search": exp(w)["search"],
            "redteam": exp(w)["redteam"]}),
    output:
        str(layout.ablation_result("{experiment}", "{variant}")),
        model_inputs("{experiment}", layout.ablation_model("{experiment}", "{variant}")),
    log:
        str(layout.log("{experiment}", "ablation/{variant}")),
    conda:
        CONDA_ENV
    threads: job("ablation", "threads")
    resources:
        **resources("ablation"),
    shell:
        stage("ablation", "--variant {wildcards.variant}")


rule ablation_table:
    input:
        lambda w: [str(layout.ablation_result(w.experiment, v)) for v in exp(w)["ablation"]["variants"]],
        model_inputs("{experiment}", "sophon"),
        str(layout.history("{experiment}", "sophon")),
        str(layout.search_result("{experiment}", "sophon")),
        lambda w: [str(layout.search_result(w.experiment, s)) for s in ("scratch", "original")
                   if s == "scratch" or "original" in exp(w)["search"]["starts"]],
        lambda w: [p for p in redteam_outputs(w.experiment) if p == str(layout.redteam_result(w.experiment, "sophon"))],
        # classification: the verdict names failing epochs at the restricted test set's majority-class share
        lambda w: split_inputs(w.experiment, "restricted_test") if exp(w)["task"] == "classification" else [],
        state=dvc_state("ablation_table", lambda w: exp(w)["ablation"]),
    output:
        str(layout.ablation_table("{experiment}")),
        str(layout.ablation_table("{experiment}").with_suffix(".json")),
    log:
        str(layout.log("{experiment}", "ablation/table")),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        **resources("report"),
    shell:
        stage("ablation", "--table")


rule ablation:
    input:
        [str(layout.ablation_table(name)) for name in EXPERIMENTS if EXPERIMENTS[name]["ablation"]["variants"]],
