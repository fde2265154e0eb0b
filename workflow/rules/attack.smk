# The learning-rate sweep (fine-tuning the original model) and the attack grid: start × attack × seed.


rule sweep:
    input:
        split_inputs("adversary", "restricted_test"),
        model_inputs("original"),
    output:
        str(layout.sweep_curve("{lr}")),
    params:
        sweep=config["sweep"],
    log:
        "logs/sweep/lr_{lr}.log",
    threads: 1
    shell:
        STAGE.format(stage="attack") + " --sweep-lr {wildcards.lr} 2> {log}"


def attack_inputs(wildcards):
    model = [] if wildcards.start == "scratch" else model_inputs(wildcards.start)
    sweep = [str(layout.sweep_curve(lr)) for lr in config["sweep"]["lrs"]]
    return split_inputs("adversary", "restricted_test") + model + sweep


rule attack:
    input:
        attack_inputs,
    output:
        str(layout.attack_curve("{attack}", "{start}", "{seed}")),
    params:
        attack=lambda wildcards: config["attacks"][wildcards.attack],
        model=lambda wildcards: config["model"] if wildcards.start == "scratch" else None,
    log:
        "logs/attacks/{attack}/{start}/seed_{seed}.log",
    threads: 1
    shell:
        STAGE.format(stage="attack") + " --attack {wildcards.attack} --start {wildcards.start} --seed {wildcards.seed} 2> {log}"
