"""Stage `gen_pretrain`: train the original diffusion model (UNet noise predictor) on the original domain
(noise-prediction MSE, t uniform per example; Adam with a one-cycle schedule)."""

import time

import torch

from sophon import layout
from sophon.diffusion import save_unet
from sophon.io import write_json
from sophon.tracking import stage_run
from sophon.train import seed_everything, train_epochs
from stages import gen_common
from stages.common import parser, run, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    config, device = setup(args)
    gen = gen_common.section(config, args.params)
    cfg = gen["pretrain"]
    train, val, test = (gen_common.part(p) for p in ("original_train", "original_val", "original_test"))
    restricted_test = gen_common.part("restricted_test")
    generator = seed_everything(cfg["seed"])
    model = gen_common.new_unet(gen, cfg["seed"]).to(device)
    objective = gen_common.objective(gen, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    steps = cfg["epochs"] * -(-len(train) // cfg["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=steps)
    began = time.perf_counter()
    with stage_run("gen_pretrain", gen["experiment"], params={"pretrain": cfg, "unet": gen["unet"],
                                                              "augment": gen["augment"]}) as tracked:
        def on_epoch(epoch):
            tracked.log_metric("original_val_mse", objective.quality(model, val, device), step=epoch)

        losses = train_epochs(model, train, optimizer, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                              generator=generator, scheduler=schedule, on_epoch=on_epoch,
                              loss=objective.finetune_loss, desc="gen_pretrain")
        metrics = {"original_val_mse": objective.quality(model, val, device),
                   "original_test_mse": objective.quality(model, test, device),
                   "restricted_test_mse": objective.quality(model, restricted_test, device)}
        seconds = time.perf_counter() - began
        save_unet(model.cpu(), layout.gen_model_dir("original"), gen_common.spec(gen),
                  gen_common.card_extra(gen, "pretrain", metrics))
        write_json(layout.gen_history("original"), {"settings": cfg, "train_loss": losses, **metrics, "seconds": seconds})
        tracked.log_metrics({**metrics, "seconds": seconds})
        tracked.log_artifact(layout.gen_model_dir("original") / layout.CARD)
    print(f"original diffusion model: original test MSE {metrics['original_test_mse']:.4f}, "
          f"restricted test MSE {metrics['restricted_test_mse']:.4f} ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
