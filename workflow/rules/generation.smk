# The generation experiment (diffusion, DoS loss): split → pretrain → protect → attack grid (attack × start × seed)
# and stability grid (suppression loss × seed) → report. Its own folders under a `generation` prefix (sophon.layout).

GEN = config["generation"]
GEN_REPORT_FILES = ["summary.json", "report.md", "report.html", "mse_curves.png", "denoise_restricted.png",
                    "denoise_original.png", "stability.png", "protect_history.png", "envelope.png"]


def gen_split_inputs(*parts):
    return [str(layout.gen_split_part(part)) for part in parts] + [str(layout.gen_split_manifest())]


def gen_model_inputs(name):
    return [str(path) for path in layout.gen_model_files(name)]


def gen_report_outputs():
    folder = layout.report_dir(GEN["experiment"])
    return [str(folder / name) for name in GEN_REPORT_FILES] + [str(folder / "curves" / f"{a}.csv") for a in GEN["attacks"]]


rule gen_split:
    output:
        gen_split_inputs(*layout.GEN_SPLIT_PARTS),
    params:
        data=GEN["data"],
        original=GEN["original"],
        restricted=GEN["restricted"],
        split=GEN["split"],
    log:
        "logs/generation/split.log",
    threads: 1
    shell:
        STAGE.format(stage="gen_split") + " 2> {log}"


rule gen_pretrain:
    input:
        gen_split_inputs("original_train", "original_val", "original_test", "restricted_test"),
    output:
        gen_model_inputs("original"),
        str(layout.gen_history("original")),
    params:
        unet=GEN["unet"],
        augment=GEN["augment"],
        eval=GEN["eval"],
        pretrain=GEN["pretrain"],
    log:
        "logs/generation/pretrain.log",
    threads: all_threads()
    priority: 10  # the critical path (pretrain → protect → Sophon attacks)
    shell:
        STAGE.format(stage="gen_pretrain") + " 2> {log}"


rule gen_protect:
    input:
        gen_split_inputs("original_train", "original_val", "original_test", "defender", "restricted_test"),
        gen_model_inputs("original"),
    output:
        gen_model_inputs("sophon"),
        str(layout.gen_history("sophon")),
    params:
        sophon=GEN["sophon"],
        augment=GEN["augment"],
        eval=GEN["eval"],
    log:
        "logs/generation/protect.log",
    threads: 1  # small batches gain little from a second thread; the other core runs stability and attacks meanwhile
    priority: 10  # the critical path
    shell:
        STAGE.format(stage="gen_protect") + " 2> {log}"


def gen_attack_inputs(wildcards):
    model = [] if wildcards.gen_start == "scratch" else gen_model_inputs(wildcards.gen_start)
    return gen_split_inputs("adversary", "restricted_test") + model


rule gen_attack:
    input:
        gen_attack_inputs,
    output:
        str(layout.gen_attack_curve("{gen_attack}", "{gen_start}", "{seed}")),
        str(layout.gen_attack_denoised("{gen_attack}", "{gen_start}", "{seed}")),
    params:
        attack=lambda wildcards: GEN["attacks"][wildcards.gen_attack],
        unet=lambda wildcards: GEN["unet"] if wildcards.gen_start == "scratch" else None,
        augment=GEN["augment"],
        eval=GEN["eval"],
        figure=[GEN["report"]["images"], GEN["report"]["denoise_timestep"]],
    wildcard_constraints:
        gen_attack="|".join(GEN["attacks"]),
        gen_start="|".join(layout.GEN_STARTS),
    log:
        "logs/generation/attacks/{gen_attack}/{gen_start}/seed_{seed}.log",
    threads: 1
    shell:
        STAGE.format(stage="gen_attack") + " --attack {wildcards.gen_attack} --start {wildcards.gen_start} --seed {wildcards.seed} 2> {log}"


rule gen_stability:
    input:
        gen_split_inputs("original_train", "original_val", "defender", "restricted_test"),
        gen_model_inputs("original"),
    output:
        str(layout.gen_stability("{loss}", "{seed}")),
    params:
        stability=GEN["stability"],
        sophon=GEN["sophon"],
        augment=GEN["augment"],
        eval=GEN["eval"],
    wildcard_constraints:
        loss="|".join(layout.GEN_SUPPRESSIONS),
    log:
        "logs/generation/stability/{loss}/seed_{seed}.log",
    threads: 1
    shell:
        STAGE.format(stage="gen_stability") + " --loss {wildcards.loss} --seed {wildcards.seed} 2> {log}"


rule gen_report:
    input:
        curves=expand(str(layout.gen_attack_curve("{attack}", "{start}", "{seed}")),
                      attack=list(GEN["attacks"]), start=layout.GEN_STARTS, seed=GEN["seeds"]),
        denoised=expand(str(layout.gen_attack_denoised("{attack}", "{start}", "{seed}")),
                        attack=list(GEN["attacks"]), start=layout.GEN_STARTS, seed=GEN["seeds"]),
        stability=expand(str(layout.gen_stability("{loss}", "{seed}")),
                         loss=GEN["stability"]["losses"], seed=GEN["stability"]["seeds"]),
        histories=[str(layout.gen_history(name)) for name in layout.GEN_MODELS],
        search=search_outputs("generation"),
        # ancient(): DVC rewrites cached files with new mtimes; a retrained model reaches the report through
        # the attack curves anyway.
        models=[ancient(path) for name in layout.GEN_MODELS for path in gen_model_inputs(name)],
        parts=[ancient(path) for path in gen_split_inputs("original_test", "restricted_test")],
    output:
        gen_report_outputs(),
    params:
        report=GEN["report"],
        experiment=GEN["experiment"],
    log:
        "logs/generation/report.log",
    threads: 1
    shell:
        STAGE.format(stage="gen_report") + " 2> {log}"
