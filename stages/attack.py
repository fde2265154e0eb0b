"""Stage `attack` (and the lr sweep): fine-tune a starting point on the adversary's half and measure the
restricted test metric after every epoch (accuracy for a classifier, fixed-noise MSE for a diffusion UNet).

    python -m stages.attack --experiment quick-classification --start sophon   # every attack × seed from sophon
    python -m stages.attack --experiment quick-classification --sweep          # every lr of the sweep

One job per start (start-up is paid once, not per run); finished runs come from the run cache (sophon.search),
so editing one attack recomputes only that attack's runs. One MLflow parent run per job, one nested child run
per attack and seed.
"""

import time

from sophon import layout
from sophon.attacks import AttackSettings, best_lr
from sophon.errors import ConfigError
from sophon.io import read_json, write_json
from sophon.search import cached_finetune
from sophon.tasks import task_of
from sophon.tracking import stage_run
from stages.common import fine_tuning_setup, parser, run, setup


def resolve_lr(exp: dict, attack: dict) -> float:
    if attack["lr"] != "auto":
        return attack["lr"]
    curves = {lr: read_json(layout.sweep_curve(exp["name"], lr))["restricted_accuracy"] for lr in exp["sweep"]["lrs"]}
    return best_lr(curves)


def planned_runs(exp: dict, args) -> tuple[str, str, list[tuple[str, int, dict, object]]]:
    """(MLflow run name, start, [(attack name, seed, settings dict, output path)]) of the job asked for."""
    name = exp["name"]
    if args.sweep:
        if "sweep" not in exp:
            raise ConfigError(f"experiment {name} has no sweep")
        sweep = exp["sweep"]
        base = {k: sweep[k] for k in ("strategy", "optimizer", "batch_size", "weight_decay", "epochs") if k in sweep}
        return "sweep", "original", [(f"lr{lr}", sweep["seed"], {**base, "lr": lr}, layout.sweep_curve(name, lr))
                                     for lr in sweep["lrs"]]
    if args.start is None:
        raise ConfigError("give --start (the paired attack grid from that start) or --sweep")
    if args.start not in task_of(exp).starts:
        raise ConfigError(f"--start {args.start!r}: a {exp['task']} experiment starts from {', '.join(task_of(exp).starts)}")
    runs = []
    for attack_name, attack in exp["attacks"].items():
        settings = {**attack, "lr": resolve_lr(exp, attack)}
        runs += [(attack_name, seed, settings, layout.attack_curve(name, attack_name, args.start, seed))
                 for seed in exp["seeds"]]
    return f"attacks/{args.start}", args.start, runs


def denoised_images(exp: dict, objective, test, device):
    """What a diffusion attack keeps of its fine-tuned model: denoisings for the report's figure."""
    from sophon.diffusion import denoise_figure_batch

    figure = exp["report"]

    def extra(model) -> dict:
        images = denoise_figure_batch(model, objective.scheduler, test, figure["images"], figure["denoise_timestep"],
                                      exp["eval"]["seed"], device)
        return {"denoised": {"timestep": figure["denoise_timestep"], "shape": list(images.shape),
                             "uint8": images.flatten().tolist()}}

    return extra


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--start", choices=layout.STARTS, help="run the paired attack grid from this start")
    p.add_argument("--sweep", action="store_true", help="run the learning-rate sweep of the original model instead")
    args = p.parse_args()
    exp, device = setup(args)
    task = task_of(exp)
    run_name, start, runs = planned_runs(exp, args)
    objective, adversary, test, build, cache = fine_tuning_setup(exp, start, device)
    extra = denoised_images(exp, objective, test, device) if exp["task"] == "diffusion" else None
    with stage_run("sweep" if args.sweep else "attack", exp["name"], name=run_name,
                   params={"start": start, "runs": len(runs)}, tags={"sophon.start": start}) as tracked:
        began, computed = time.perf_counter(), 0
        for attack_name, seed, attack, out in runs:
            settings = AttackSettings(**attack)
            record, cached = cached_finetune(cache, build, settings, seed, from_scratch=start == "scratch",
                                             objective=objective, adversary=adversary, test=test, device=device,
                                             extra=extra)
            computed += not cached
            curve = record["curve"]
            document = {"attack": attack_name, "start": start, "seed": seed, "settings": attack, task.metric: curve,
                        **{k: v for k, v in record.items() if k != "curve"}}
            write_json(out, document)
            tracked.child(f"{attack_name}/seed{seed}", params={"attack": attack_name, "seed": seed, **attack},
                          metrics={f"{task.metric}_last": curve[-1]}, curve=(task.metric, curve),
                          tags={"sophon.attack": attack_name, "sophon.cached": cached})
            print(f"{run_name} {attack_name} seed {seed}: lr {settings.lr}, {task.metric} epoch 0 {curve[0]:.4g} → "
                  f"epoch {len(curve) - 1} {curve[-1]:.4g}{' (cached)' if cached else ''}")
        tracked.log_metrics({"seconds": time.perf_counter() - began, "runs_computed": computed,
                             "runs_cached": len(runs) - computed})


if __name__ == "__main__":
    run(main)
