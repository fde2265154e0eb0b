"""Stage `attack` (and `sweep`): fine-tune a starting point on the adversary's half and measure the restricted
test metric after every epoch (accuracy for a classifier, fixed-noise MSE for a diffusion UNet).

    python -m stages.attack --experiment quick-classification --attack direct_all --start sophon --seed 0
    python -m stages.attack --experiment quick-classification --sweep-lr 0.01   # one lr of the sweep
"""

import time

from sophon import layout
from sophon.attacks import AttackSettings, best_lr, get_attack
from sophon.errors import ConfigError
from sophon.io import read_json, write_json
from sophon.tasks import load_model, new_model, task_of
from sophon.tracking import stage_run
from sophon.train import seed_everything
from stages.common import parser, parts, run, setup


def resolve_lr(exp: dict, attack: dict) -> float:
    if attack["lr"] != "auto":
        return attack["lr"]
    curves = {lr: read_json(layout.sweep_curve(exp["name"], lr))["restricted_accuracy"] for lr in exp["sweep"]["lrs"]}
    return best_lr(curves)


def chosen_attack(exp: dict, args) -> tuple[str, str, int, dict, object]:
    """(name, start, seed, settings dict, output path) of the sweep point or attack cell asked for."""
    if args.sweep_lr is not None:
        if "sweep" not in exp:
            raise ConfigError(f"experiment {exp['name']} has no sweep")
        sweep = exp["sweep"]
        lrs = {float(lr): lr for lr in sweep["lrs"]}
        if args.sweep_lr not in lrs:
            raise ConfigError(f"--sweep-lr {args.sweep_lr} is not in sweep.lrs {sweep['lrs']}")
        attack = {k: sweep[k] for k in ("strategy", "optimizer", "batch_size", "weight_decay", "epochs")}
        attack.update(method="finetune", lr=lrs[args.sweep_lr])
        return "sweep", "original", sweep["seed"], attack, layout.sweep_curve(exp["name"], lrs[args.sweep_lr])
    if args.attack not in exp["attacks"]:
        raise ConfigError(f"--attack {args.attack!r} is not in the attacks of {exp['name']}: {', '.join(exp['attacks'])}")
    if args.seed is None or args.start is None:
        raise ConfigError("--start and --seed are required with --attack")
    if args.start not in task_of(exp).starts:
        raise ConfigError(f"--start {args.start!r}: a {exp['task']} experiment starts from {', '.join(task_of(exp).starts)}")
    attack = dict(exp["attacks"][args.attack])
    attack["lr"] = resolve_lr(exp, attack)
    return (args.attack, args.start, args.seed, attack,
            layout.attack_curve(exp["name"], args.attack, args.start, args.seed))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--attack", help="an attack name of the experiment's attacks")
    p.add_argument("--start", choices=layout.STARTS)
    p.add_argument("--seed", type=int)
    p.add_argument("--sweep-lr", type=float, help="run the learning-rate sweep at this lr instead")
    args = p.parse_args()
    exp, device = setup(args)
    task = task_of(exp)
    name, start, seed, attack, out = chosen_attack(exp, args)
    settings = AttackSettings(**attack)
    adversary, test = parts(exp, "adversary", "restricted_test")
    seed_everything(seed)
    model = new_model(exp, seed, device) if start == "scratch" else load_model(exp, start, device)[0]
    objective = task.objective(exp, device)
    run_name = f"{name}/{start}/seed{seed}" if name != "sweep" else f"sweep/lr{settings.lr}"
    with stage_run("sweep" if name == "sweep" else "attack", exp["name"], name=run_name,
                   params={"attack": name, "start": start, "seed": seed, **attack},
                   tags={"sophon.attack": name, "sophon.start": start}) as tracked:
        began = time.perf_counter()
        curve = get_attack(settings.method)(
            model, adversary, test, settings, seed=seed, device=device, from_scratch=start == "scratch",
            objective=objective, on_epoch=lambda epoch, value: tracked.log_metric(task.metric, value, step=epoch))
        seconds = time.perf_counter() - began
        document = {"attack": name, "start": start, "seed": seed, "settings": attack, task.metric: curve,
                    "seconds": seconds}
        if exp["task"] == "diffusion":  # the fine-tuned model's denoisings for the report's figure
            from sophon.diffusion import denoise_figure_batch

            figure = exp["report"]
            images = denoise_figure_batch(model, objective.scheduler, test, figure["images"],
                                          figure["denoise_timestep"], exp["eval"]["seed"], device)
            document["denoised"] = {"timestep": figure["denoise_timestep"], "shape": list(images.shape),
                                    "uint8": images.flatten().tolist()}
        write_json(out, document)
        tracked.log_metric("seconds", seconds)
    print(f"{run_name}: lr {settings.lr}, {task.metric} epoch 0 {curve[0]:.4g} → epoch {len(curve) - 1} {curve[-1]:.4g}")


if __name__ == "__main__":
    run(main)
