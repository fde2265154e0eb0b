"""Stage `gen_protect`: Sophon for diffusion — DoS suppression after simulated fine-tuning on the defender's
faces, noise-MSE reinforcement on the original domain (the same loop as classification, sophon.protect)."""

import dataclasses
import time

from sophon import layout
from sophon.diffusion import save_unet
from sophon.io import write_json
from sophon.protect import protect
from sophon.tracking import stage_run
from sophon.train import seed_everything
from stages import gen_common
from stages.common import parser, run, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    config, device = setup(args)
    gen = gen_common.section(config, args.params)
    cfg = gen["sophon"]
    original_train, original_val, original_test, defender, restricted_test = (
        gen_common.part(p) for p in ("original_train", "original_val", "original_test", "defender", "restricted_test"))
    model, _ = gen_common.model("original", device)
    seed_everything(cfg["seed"])
    settings = gen_common.protect_settings(cfg)
    objective = gen_common.objective(gen, device)
    began = time.perf_counter()
    with stage_run("gen_protect", gen["experiment"], params={"sophon": cfg, "augment": gen["augment"]}) as tracked:
        def on_check(check):
            tracked.log_metrics({"original_val_mse": check["quality"], "suppression_loss": check["suppression_loss"],
                                 "rolled_back": int(check["rolled_back"])}, step=check["loop"])

        history = protect(model, objective, defender, original_train, original_val, settings, seed=cfg["seed"],
                          device=device, on_check=on_check)
        metrics = {"original_test_mse": objective.quality(model, original_test, device),
                   "original_val_mse": objective.quality(model, original_val, device),
                   "restricted_test_mse": objective.quality(model, restricted_test, device)}
        seconds = time.perf_counter() - began
        tracked.log_metrics({**metrics, "rollbacks": history.rollbacks, "nonfinite_loops": history.nonfinite,
                             "seconds": seconds})
        write_json(layout.gen_history("sophon"), {"settings": dataclasses.asdict(settings),
                                                  **dataclasses.asdict(history), **metrics, "seconds": seconds})
        save_unet(model.cpu(), layout.gen_model_dir("sophon"), gen_common.spec(gen),
                  gen_common.card_extra(gen, "sophon", {**metrics, "suppression": cfg["suppression"]}))
        tracked.log_artifact(layout.gen_model_dir("sophon") / layout.CARD)
    print(f"Sophon diffusion model: original test MSE {metrics['original_test_mse']:.4f}, restricted test MSE "
          f"(before fine-tuning) {metrics['restricted_test_mse']:.4f}, {history.rollbacks} rollbacks ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
