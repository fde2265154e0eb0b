# The paired attack grid (start × attack × seed), the learning-rate sweep (classification) and the stability study.


def attack_inputs(wildcards):
    name = wildcards.experiment
    model = [] if wildcards.start == "scratch" else model_inputs(name, wildcards.start)
    sweep = [str(layout.sweep_curve(name, lr)) for lr in EXPERIMENTS[name].get("sweep", {}).get("lrs", [])]
    return split_inputs(name, "adversary", "restricted_test") + model + sweep


rule sweep:
    input:
        parts_of("adversary", "restricted_test"),
        original_model,
    output:
        str(layout.sweep_curve("{experiment}", "{lr}")),
    params:
        sweep=lambda w: exp(w)["sweep"],
    log:
        str(layout.log("{experiment}", "sweep/lr_{lr}")),
    threads: 1
    shell:
        stage("attack", "--sweep-lr {wildcards.lr}")


rule attack:
    input:
        attack_inputs,
    output:
        str(layout.attack_curve("{experiment}", "{attack}", "{start}", "{seed}")),
    params:
        attack=lambda w: exp(w)["attacks"][w.attack],
        model=lambda w: (exp(w).get("model") or exp(w).get("unet")) if w.start == "scratch" else None,
    log:
        str(layout.log("{experiment}", "attacks/{attack}/{start}/seed_{seed}")),
    threads: 1
    shell:
        stage("attack", "--attack {wildcards.attack} --start {wildcards.start} --seed {wildcards.seed}")


rule stability:
    input:
        parts_of("original_train", "original_val", "defender", "restricted_test"),
        original_model,
    output:
        str(layout.stability("{experiment}", "{loss}", "{seed}")),
    params:
        stability=lambda w: exp(w)["stability"],
        sophon=lambda w: exp(w)["sophon"],
    log:
        str(layout.log("{experiment}", "stability/{loss}/seed_{seed}")),
    threads: 1
    shell:
        stage("stability", "--loss {wildcards.loss} --seed {wildcards.seed}")
