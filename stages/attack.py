"""Stage `attack` (and `sweep`): fine-tune a starting point on the adversary's half, test after every epoch.

    python -m stages.attack --attack direct_all --start sophon --seed 0   # one cell of the attack grid
    python -m stages.attack --sweep-lr 0.01                              # one learning rate of the sweep
"""

import time

from sophon import layout
from sophon.attacks import AttackSettings, best_lr, get_attack
from sophon.data.splits import load_part
from sophon.errors import ConfigError
from sophon.io import read_json, write_json
from sophon.models import build_classifier, load_classifier
from sophon.tracking import stage_run
from sophon.train import seed_everything
from stages.common import parser, run, setup


def resolve_lr(config: dict, attack: dict) -> float:
    if attack["lr"] != "auto":
        return attack["lr"]
    curves = {lr: read_json(layout.sweep_curve(lr))["restricted_accuracy"] for lr in config["sweep"]["lrs"]}
    return best_lr(curves)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--attack", help="an attack name from params.yaml's attacks")
    p.add_argument("--start", choices=layout.STARTS, default="original")
    p.add_argument("--seed", type=int)
    p.add_argument("--sweep-lr", type=float, help="run the learning-rate sweep at this lr instead")
    args = p.parse_args()
    config, device = setup(args)
    if args.sweep_lr is not None:
        sweep = config["sweep"]
        lrs = {float(lr): lr for lr in sweep["lrs"]}
        if args.sweep_lr not in lrs:
            raise ConfigError(f"--sweep-lr {args.sweep_lr} is not in sweep.lrs {sweep['lrs']}")
        attack = {k: sweep[k] for k in ("strategy", "optimizer", "batch_size", "weight_decay", "epochs")}
        attack.update(method="finetune", lr=lrs[args.sweep_lr])
        name, start, seed, out = "sweep", "original", sweep["seed"], layout.sweep_curve(lrs[args.sweep_lr])
    else:
        if args.attack not in config["attacks"]:
            raise ConfigError(f"--attack {args.attack!r} is not in params.yaml's attacks: {', '.join(config['attacks'])}")
        if args.seed is None:
            raise ConfigError("--seed is required with --attack")
        attack = dict(config["attacks"][args.attack])
        attack["lr"] = resolve_lr(config, attack)
        name, start, seed, out = args.attack, args.start, args.seed, layout.attack_curve(args.attack, args.start, args.seed)

    settings = AttackSettings(**attack)
    manifest = layout.split_manifest()
    adversary, test = load_part(layout.split_part("adversary"), manifest), load_part(layout.split_part("restricted_test"), manifest)
    seed_everything(seed)
    if start == "scratch":
        model = build_classifier(config["model"]["arch"], config["model"]["num_classes"], config["data"]["channels"])
    else:
        model, _ = load_classifier(layout.model_dir(start))
    model.to(device)
    run_name = f"{name}/{start}/seed{seed}" if name != "sweep" else f"sweep/lr{settings.lr}"
    with stage_run("sweep" if name == "sweep" else "attack", config["experiment"], name=run_name,
                   params={"attack": name, "start": start, "seed": seed, **attack},
                   tags={"sophon.attack": name, "sophon.start": start}) as tracked:
        began = time.perf_counter()
        curve = get_attack(settings.method)(
            model, adversary, test, settings, seed=seed, device=device, from_scratch=start == "scratch",
            on_epoch=lambda epoch, acc: tracked.log_metric("restricted_accuracy", acc, step=epoch))
        seconds = time.perf_counter() - began
        write_json(out, {"attack": name, "start": start, "seed": seed, "settings": attack,
                         "restricted_accuracy": curve, "seconds": seconds})
        tracked.log_metric("seconds", seconds)
    print(f"{run_name}: lr {settings.lr}, restricted accuracy epoch 0 {curve[0]:.1f}% → epoch {len(curve) - 1} {curve[-1]:.1f}%")


if __name__ == "__main__":
    run(main)
