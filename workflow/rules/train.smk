# The original model, the NTL baseline (B3) and the Sophon-protected model.


rule pretrain:
    input:
        split_inputs("original_train", "original_test"),
    output:
        model_inputs("original"),
    params:
        model=config["model"],
        pretrain=config["pretrain"],
    log:
        "logs/pretrain.log",
    threads: all_threads()
    priority: 10
    shell:
        STAGE.format(stage="pretrain") + " 2> {log}"


rule ntl:
    input:
        split_inputs("original_train", "original_test", "defender", "restricted_test"),
        model_inputs("original"),
    output:
        model_inputs("ntl"),
        str(layout.history("ntl")),
    params:
        ntl=config["ntl"],
    log:
        "logs/ntl.log",
    threads: 1
    shell:
        STAGE.format(stage="ntl") + " 2> {log}"


rule protect:
    input:
        split_inputs("original_train", "original_test", "defender", "restricted_test"),
        model_inputs("original"),
    output:
        model_inputs("sophon"),
        str(layout.history("sophon")),
    params:
        sophon=config["sophon"],
    log:
        "logs/protect.log",
    threads: 1  # small inner batches gain little from a second thread; the other core runs attacks meanwhile
    priority: 10  # the critical path: start it before the attacks that do not need it
    shell:
        STAGE.format(stage="protect") + " 2> {log}"
