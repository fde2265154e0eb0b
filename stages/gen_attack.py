"""Stage `gen_attack`: fine-tune a starting point (scratch, original or Sophon UNet; direct, all parameters) on the
adversary's faces and measure the fixed-noise restricted test MSE after every epoch.

    python -m stages.gen_attack --attack adam --start sophon --seed 0
"""

import time

from safetensors.torch import save_file

from sophon import layout
from sophon.attacks import AttackSettings, get_attack
from sophon.diffusion import denoise_figure_batch
from sophon.errors import ConfigError
from sophon.io import atomic_path, write_json
from sophon.tracking import stage_run
from sophon.train import seed_everything
from stages import gen_common
from stages.common import parser, run, setup


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--attack", required=True, help="an attack name from params.yaml's generation.attacks")
    p.add_argument("--start", choices=layout.GEN_STARTS, required=True)
    p.add_argument("--seed", type=int, required=True)
    args = p.parse_args()
    config, device = setup(args)
    gen = gen_common.section(config, args.params)
    if args.attack not in gen["attacks"]:
        raise ConfigError(f"--attack {args.attack!r} is not in params.yaml's generation.attacks: "
                          f"{', '.join(gen['attacks'])}")
    attack = dict(gen["attacks"][args.attack])
    settings = AttackSettings(strategy="direct+all", **attack)
    adversary, test = gen_common.part("adversary"), gen_common.part("restricted_test")
    seed_everything(args.seed)
    if args.start == "scratch":
        model = gen_common.new_unet(gen, args.seed).to(device)
    else:
        model, _ = gen_common.model(args.start, device)
    objective = gen_common.objective(gen, device)
    name = f"{args.attack}/{args.start}/seed{args.seed}"
    with stage_run("gen_attack", gen["experiment"], name=name,
                   params={"attack": args.attack, "start": args.start, "seed": args.seed, **attack},
                   tags={"sophon.attack": args.attack, "sophon.start": args.start}) as tracked:
        began = time.perf_counter()
        curve = get_attack(settings.method)(
            model, adversary, test, settings, seed=args.seed, device=device, from_scratch=args.start == "scratch",
            objective=objective, on_epoch=lambda epoch, mse: tracked.log_metric("restricted_mse", mse, step=epoch))
        seconds = time.perf_counter() - began
        figure = gen["report"]
        denoised = denoise_figure_batch(model, objective.scheduler, test, figure["images"], figure["denoise_timestep"],
                                        gen["eval"]["seed"], device)
        with atomic_path(layout.gen_attack_denoised(args.attack, args.start, args.seed)) as tmp:
            save_file({"images": denoised.contiguous()}, str(tmp), metadata={"timestep": str(figure["denoise_timestep"])})
        write_json(layout.gen_attack_curve(args.attack, args.start, args.seed),
                   {"attack": args.attack, "start": args.start, "seed": args.seed, "settings": attack,
                    "restricted_mse": curve, "seconds": seconds})
        tracked.log_metric("seconds", seconds)
    print(f"{name}: restricted MSE epoch 0 {curve[0]:.4f} → epoch {len(curve) - 1} {curve[-1]:.4f} ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
