# The paired attack grid (one job per start: every attack × seed), the learning-rate sweep (classification, one
# job) and the stability study (diffusion, one job). Each job writes a folder of curves; finished runs come from
# the run cache, so editing one attack recomputes only its runs.


rule sweep:
    input:
        parts_of("adversary", "restricted_test"),
        original_model,
        state=dvc_state("sweep", lambda w: exp(w)["sweep"]),
    output:
        directory(str(layout.sweep_dir("{experiment}"))),
    log:
        str(layout.log("{experiment}", "sweep")),
    conda:
        CONDA_ENV
    threads: job("sweep", "threads")
    resources:
        **resources("sweep"),
    priority: 6  # every classification attack job waits for its lr: run it before the long searches
    shell:
        stage("attack", "--sweep")


rule attack:
    input:
        attack_inputs,
        state=dvc_state("attack", lambda w: {
            "attacks": exp(w)["attacks"], "seeds": exp(w)["seeds"],
            "model": (exp(w).get("model") or exp(w).get("unet")) if w.start == "scratch" else None}),
    output:
        directory(str(layout.attack_dir("{experiment}", "{start}"))),
    log:
        str(layout.log("{experiment}", "attacks/{start}")),
    conda:
        CONDA_ENV
    threads: job("attack", "threads")
    resources:
        **resources("attack"),
    shell:
        stage("attack", "--start {wildcards.start}")


rule stability:
    input:
        parts_of("original_train", "original_val", "defender", "restricted_test"),
        original_model,
        state=dvc_state("stability", lambda w: {"stability": exp(w)["stability"], "sophon": exp(w)["sophon"]}),
    output:
        directory(str(layout.stability_dir("{experiment}"))),
    log:
        str(layout.log("{experiment}", "stability")),
    conda:
        CONDA_ENV
    threads: job("stability", "threads")
    resources:
        **resources("stability"),
    priority: 5  # 4 min that only the report waits on: run it among the searches, not alone at the end
    shell:
        stage("stability")
