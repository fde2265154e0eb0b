REPORT_FILES = ["summary.json", "report.md", "report.html", "restricted_accuracy.png", "protect_history.png", "sweep.png",
                "envelope.png"]


def report_outputs():
    folder = layout.report_dir(config["experiment"])
    return [str(folder / name) for name in REPORT_FILES] + [str(folder / "curves" / f"{a}.csv") for a in config["attacks"]]


rule report:
    input:
        curves=expand(str(layout.attack_curve("{attack}", "{start}", "{seed}")),
                      attack=list(config["attacks"]), start=layout.STARTS, seed=config["seeds"]),
        sweep=[str(layout.sweep_curve(lr)) for lr in config["sweep"]["lrs"]],
        histories=[str(layout.history(name)) for name in ("ntl", "sophon")],
        cards=[str(layout.model_dir(name) / layout.CARD) for name in layout.MODELS],
        search=search_outputs("classification"),
    output:
        report_outputs(),
    params:
        report=config["report"],
        experiment=config["experiment"],
    log:
        "logs/report.log",
    threads: 1
    shell:
        STAGE.format(stage="report") + " 2> {log}"
