"""Stage `stability`: the paper's stability study (§5.8, Fig. 13–14) — a Sophon run from the original model with
one suppression loss and one seed, without rollback; records the suppression loss of every loop and whether it
went NaN or diverged.

    python -m stages.stability --experiment quick-generation --loss neg_mse --seed 1
"""

import time

from sophon import layout
from sophon.diffusion import classify_run
from sophon.errors import ConfigError
from sophon.io import write_json
from sophon.protect import protect
from sophon.tasks import load_model, task_of
from sophon.tracking import stage_run
from sophon.train import seed_everything
from stages.common import parser, parts, run, setup
from stages.protect import protect_settings


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--loss", required=True)
    p.add_argument("--seed", type=int, required=True)
    args = p.parse_args()
    exp, device = setup(args)
    if "stability" not in exp:
        raise ConfigError(f"experiment {exp['name']} has no stability study")
    cfg, name = exp["stability"], exp["name"]
    if args.loss not in cfg["losses"]:
        raise ConfigError(f"--loss {args.loss!r} is not in the stability losses of {name}: {', '.join(cfg['losses'])}")
    original_train, original_val, defender, restricted_test = parts(
        exp, "original_train", "original_val", "defender", "restricted_test")
    model, _ = load_model(exp, "original", device)
    seed_everything(args.seed)
    # Same settings as the protect stage but no rollback and no intermediate checks: the loss runs its course.
    settings = protect_settings(exp, loops=cfg["loops"], check_every=cfg["loops"], rollback_tolerance=1e30)
    objective = task_of(exp).objective(exp, device, suppression=args.loss)
    run_name = f"{args.loss}/seed{args.seed}"
    with stage_run("stability", name, name=run_name, params={"loss": args.loss, "seed": args.seed, **cfg},
                   tags={"sophon.suppression": args.loss}) as tracked:
        began = time.perf_counter()
        history = protect(model, objective, defender, original_train, original_val, settings, seed=args.seed,
                          device=device)
        seconds = time.perf_counter() - began
        for loop, loss in zip(history.loop, history.suppression_loss):
            if loss == loss and abs(loss) < float("inf"):
                tracked.log_metric("suppression_loss", loss, step=loop)
        outcome = classify_run(history.suppression_loss, threshold=cfg["divergence_threshold"])
        final = history.checks[-1]["quality"]
        restricted = objective.quality(model, restricted_test, device)
        tracked.log_metrics({"nonfinite_loops": history.nonfinite, "seconds": seconds, "diverged": int(outcome != "stable")})
        tracked.set_tag("sophon.outcome", outcome)
        write_json(layout.stability(name, args.loss, args.seed),
                   {"loss": args.loss, "seed": args.seed, "outcome": outcome, "loops": history.loop,
                    "suppression_loss": [v if v == v and abs(v) < float("inf") else None
                                         for v in history.suppression_loss],
                    "nonfinite_loops": history.nonfinite, "original_val_mse_end": final if final == final else None,
                    "restricted_test_mse_end": restricted if restricted == restricted else None,
                    "divergence_threshold": cfg["divergence_threshold"], "seconds": seconds})
    print(f"stability {run_name}: {outcome}, {history.nonfinite} non-finite loops ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
