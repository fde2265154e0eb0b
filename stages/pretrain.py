"""Stage `pretrain`: train the original model on the original domain (Adam, one-cycle schedule) with the task's
loss: cross-entropy for a classifier, noise-prediction MSE (t uniform per example) for a diffusion UNet. With
`original.checkpoint` set, the original model is imported instead (a timm classifier's `.safetensors` state dict
or a diffusers UNet folder) and only evaluated. Either way the model is also released in its ecosystem's format
(models/<experiment>/original/release).

    python -m stages.pretrain --experiment quick-generation
"""

import time

import torch

from sophon import layout
from sophon.io import write_json
from sophon.tasks import new_model, task_of
from sophon.tracking import stage_run
from sophon.train import seed_everything, train_epochs
from stages.common import parser, parts, run, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    exp, device = setup(args)
    task, cfg, name = task_of(exp), exp["pretrain"], exp["name"]
    checkpoint = exp["original"].get("checkpoint")
    train, val, test, restricted_test = parts(exp, "original_train", "original_val", "original_test", "restricted_test")
    objective = task.objective(exp, device)
    quality = "accuracy" if objective.higher_is_better else "mse"
    began = time.perf_counter()
    params = {"pretrain": cfg, "model": exp.get("model") or exp.get("unet"), "checkpoint": checkpoint}
    with stage_run("pretrain", name, params=params) as tracked:
        if checkpoint:
            model, source = task.imported(exp)
            model = model.to(device)
            tracked.set_tag("sophon.imported", source["path"])
            tracked.set_tag("sophon.imported_sha256", source["sha256"])
            history = {"imported": True, "source": source, "train_loss": []}
            extra = {"source": source}
        else:
            generator = seed_everything(cfg["seed"])
            model = new_model(exp, cfg["seed"], device)
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
            steps = cfg["epochs"] * -(-len(train) // cfg["batch_size"])
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=steps)

            def on_epoch(epoch):
                tracked.log_metric(f"original_val_{quality}", objective.quality(model, val, device), step=epoch)

            losses = train_epochs(model, train, optimizer, epochs=cfg["epochs"], batch_size=cfg["batch_size"],
                                  generator=generator, device=device, scheduler=schedule, on_epoch=on_epoch,
                                  loss=objective.finetune_loss, desc="pretrain")
            history, extra = {"settings": cfg, "train_loss": losses}, {}
        metrics = {f"original_test_{quality}": objective.quality(model, test, device),
                   f"restricted_test_{quality}": objective.quality(model, restricted_test, device)}
        if checkpoint:
            tracked.log_metric(f"original_val_{quality}", objective.quality(model, val, device))
        seconds = time.perf_counter() - began
        task.save(model, exp, "original", "pretrain", {**metrics, **extra})
        task.release(model, exp, "original")
        write_json(layout.history(name, "original"), {**history, **metrics, "seconds": seconds})
        tracked.log_metrics({**metrics, "seconds": seconds})
        tracked.log_artifact(layout.model_dir(name, "original") / layout.CARD)
    how = f"imported from {checkpoint}" if checkpoint else "trained"
    print(f"original model ({how}): " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f" ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
