# Split, the original model, the NTL baseline (classification) and the Sophon-protected model.


rule split:
    input:
        # original.checkpoint only concerns pretrain: a new one does not redo the split
        state=dvc_state("split", lambda w: {k: without_checkpoint(exp(w)[k]) for k in ("data", "original", "restricted", "split")}),
    output:
        [str(layout.split_part("{experiment}", part)) for part in layout.SPLIT_PARTS],
        str(layout.split_manifest("{experiment}")),
    log:
        str(layout.log("{experiment}", "split")),
    conda:
        CONDA_ENV
    threads: job("split", "threads")
    resources:
        **resources("split"),
    shell:
        stage("split")


rule pretrain:
    input:
        parts_of("original_train", "original_val", "original_test", "restricted_test"),
        imported_checkpoint,
        state=dvc_state("pretrain", lambda w: {**{k: exp(w).get(k) for k in ("model", "unet", "augment", "eval", "pretrain")},
                                               "checkpoint": exp(w)["original"].get("checkpoint")}),
    output:
        model_inputs("{experiment}", "original"),
        str(layout.history("{experiment}", "original")),
        directory(str(layout.release_dir("{experiment}", "original"))),
    log:
        str(layout.log("{experiment}", "pretrain")),
    conda:
        CONDA_ENV
    threads: job("pretrain", "threads")
    resources:
        **resources("pretrain"),
    priority: 10
    shell:
        stage("pretrain")


rule ntl:
    input:
        parts_of("original_train", "original_test", "defender", "restricted_test"),
        original_model,
        state=dvc_state("ntl", lambda w: exp(w)["ntl"]),
    output:
        model_inputs("{experiment}", "ntl"),
        str(layout.history("{experiment}", "ntl")),
    log:
        str(layout.log("{experiment}", "ntl")),
    conda:
        CONDA_ENV
    threads: job("ntl", "threads")
    resources:
        **resources("ntl"),
    shell:
        stage("ntl")


rule protect:
    input:
        parts_of("original_train", "original_val", "original_test", "defender", "restricted_test"),
        original_model,
        state=dvc_state("protect", lambda w: exp(w)["sophon"]),
    output:
        model_inputs("{experiment}", "sophon"),
        str(layout.history("{experiment}", "sophon")),
        directory(str(layout.release_dir("{experiment}", "sophon"))),
    log:
        str(layout.log("{experiment}", "protect")),
    conda:
        CONDA_ENV
    threads: job("protect", "threads")
    resources:
        **resources("protect"),
    priority: 10  # the critical path: start it before the attacks that do not need it
    shell:
        stage("protect")
