# Split, the original model, the NTL baseline (classification) and the Sophon-protected model.


rule split:
    output:
        [str(layout.split_part("{experiment}", part)) for part in layout.SPLIT_PARTS],
        str(layout.split_manifest("{experiment}")),
    params:
        data=lambda w: {k: exp(w)[k] for k in ("data", "original", "restricted", "split")},
    log:
        str(layout.log("{experiment}", "split")),
    threads: 1
    shell:
        stage("split")


rule pretrain:
    input:
        parts_of("original_train", "original_val", "original_test", "restricted_test"),
    output:
        model_inputs("{experiment}", "original"),
        str(layout.history("{experiment}", "original")),
    params:
        model=lambda w: {k: exp(w).get(k) for k in ("model", "unet", "augment", "eval", "pretrain")},
    log:
        str(layout.log("{experiment}", "pretrain")),
    # One thread: a two-thread job waits until both cores are free, and the single-thread attack jobs that
    # are ready at the start kept it waiting 8 minutes in a measured run (the critical path: pretrain → protect).
    threads: 1
    priority: 10
    shell:
        stage("pretrain")


rule ntl:
    input:
        parts_of("original_train", "original_test", "defender", "restricted_test"),
        original_model,
    output:
        model_inputs("{experiment}", "ntl"),
        str(layout.history("{experiment}", "ntl")),
    params:
        ntl=lambda w: exp(w)["ntl"],
    log:
        str(layout.log("{experiment}", "ntl")),
    threads: 1
    shell:
        stage("ntl")


rule protect:
    input:
        parts_of("original_train", "original_val", "original_test", "defender", "restricted_test"),
        original_model,
    output:
        model_inputs("{experiment}", "sophon"),
        str(layout.history("{experiment}", "sophon")),
    params:
        sophon=lambda w: exp(w)["sophon"],
    log:
        str(layout.log("{experiment}", "protect")),
    threads: 1  # small inner batches gain little from a second thread; the other core runs attacks meanwhile
    priority: 10  # the critical path: start it before the attacks that do not need it
    shell:
        stage("protect")
