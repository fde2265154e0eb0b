# One report per experiment. Its files depend on the task (figures) and the experiment (one CSV per attack),
# so the rule is written once and instantiated per experiment.

def report_outputs(name):
    folder = layout.report_dir(name)
    experiment = EXPERIMENTS[name]
    return ([str(folder / f) for f in ("summary.json", "report.md", "report.html")]
            + [str(folder / f"{figure}.png") for figure in layout.REPORT_FIGURES[experiment["task"]]]
            + [str(folder / "curves" / f"{attack}.csv") for attack in experiment["attacks"]])


def report_inputs(name):
    experiment, starts = EXPERIMENTS[name], task(name).starts
    inputs = {
        "curves": [str(layout.attack_dir(name, s)) for s in starts],
        "histories": [str(layout.history(name, m)) for m in task(name).models()],
        "cards": [str(layout.model_dir(name, m) / layout.CARD) for m in task(name).models()],
        "search": search_outputs(name),
        "sweep": [str(layout.sweep_dir(name))] if "sweep" in experiment else [],
        "stability": [str(layout.stability_dir(name))] if "stability" in experiment else [],
    }
    if experiment["task"] == "diffusion":
        # The denoising figures load the models and test parts. ancient(): DVC rewrites cached files with new
        # mtimes; a retrained model reaches the report through the attack curves anyway.
        inputs["models"] = [ancient(p) for m in task(name).models() for p in model_inputs(name, m)]
        inputs["parts"] = [ancient(p) for p in split_inputs(name, "original_test", "restricted_test")]
    return inputs


for _name in EXPERIMENTS:

    rule:
        name:
            f"report_{_name}"
        input:
            **report_inputs(_name),
        output:
            report_outputs(_name),
        params:
            experiment=_name,  # the shell command is formatted when the job runs, after the loop: bind it here
            report=EXPERIMENTS[_name]["report"],
        log:
            str(layout.log(_name, "report")),
        threads: 1
        shell:
            "python -m stages.report --params " + PARAMS_FILE + " --experiment {params.experiment} 2> {log}"
