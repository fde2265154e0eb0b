"""Stage `stability`: the paper's stability study (§5.8, Fig. 13–14) — Sophon runs from the original model, one
per suppression loss and seed, without rollback; each records the suppression loss of every loop and whether
it went NaN or diverged. One job runs every loss × seed (start-up is paid once).

    python -m stages.stability --experiment quick-generation
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


def finite(value: float) -> bool:
    return value == value and abs(value) < float("inf")


def main() -> None:
    args = parser(__doc__).parse_args()
    exp, device = setup(args)
    if "stability" not in exp:
        raise ConfigError(f"experiment {exp['name']} has no stability study")
    cfg, name = exp["stability"], exp["name"]
    original_train, original_val, defender, restricted_test = parts(
        exp, "original_train", "original_val", "defender", "restricted_test")
    # Same settings as the protect stage but no rollback and no intermediate checks: the loss runs its course.
    settings = protect_settings(exp, loops=cfg["loops"], check_every=cfg["loops"], rollback_tolerance=1e30, select="last")
    with stage_run("stability", name, name="stability", params=cfg) as tracked:
        for loss in cfg["losses"]:
            objective = task_of(exp).objective(exp, device, suppression=loss)
            for seed in cfg["seeds"]:
                model, _ = load_model(exp, "original", device)
                seed_everything(seed)
                began = time.perf_counter()
                history = protect(model, objective, defender, original_train, original_val, settings, seed=seed,
                                  device=device)
                seconds = time.perf_counter() - began
                outcome = classify_run(history.suppression_loss, threshold=cfg["divergence_threshold"])
                final = history.checks[-1]["quality"]
                restricted = objective.quality(model, restricted_test, device)
                tracked.child(f"{loss}/seed{seed}", params={"loss": loss, "seed": seed},
                              metrics={"nonfinite_loops": history.nonfinite, "seconds": seconds,
                                       "diverged": int(outcome != "stable")},
                              curve=("suppression_loss", history.suppression_loss), steps=history.loop,
                              tags={"sophon.suppression": loss, "sophon.outcome": outcome})
                write_json(layout.stability(name, loss, seed),
                           {"loss": loss, "seed": seed, "outcome": outcome, "loops": history.loop,
                            "suppression_loss": [v if finite(v) else None for v in history.suppression_loss],
                            "nonfinite_loops": history.nonfinite, "original_val_mse_end": final if final == final else None,
                            "restricted_test_mse_end": restricted if restricted == restricted else None,
                            "divergence_threshold": cfg["divergence_threshold"], "seconds": seconds})
                print(f"stability {loss}/seed{seed}: {outcome}, {history.nonfinite} non-finite loops ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
