# One report per experiment. Its files depend on the task (figures) and the experiment (one CSV per attack),
# so the rule is written once and instantiated per experiment.

for _name in EXPERIMENTS:

    rule:
        name:
            f"report_{_name}"
        input:
            **report_inputs(_name),
            state=dvc_state(f"report_{_name}", lambda w, name=_name: {
                "report": EXPERIMENTS[name]["report"], "seeds": EXPERIMENTS[name]["seeds"]}),
        output:
            report_outputs(_name),
        params:
            experiment=_name,  # the shell command is formatted when the job runs, after the loop: bind it here
        log:
            str(layout.log(_name, "report")),
        conda:
            CONDA_ENV
        threads: job("report", "threads")
        resources:
            **resources("report"),
        shell:
            f"python -m stages.report --params {PARAMS_FILE} --experiment {{params.experiment}} 2> {{log}}"
