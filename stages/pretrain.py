"""Stage `pretrain`: train the original model on the original domain (Adam, one-cycle schedule)."""

import torch

from sophon import layout
from sophon.data.splits import load_part
from sophon.io import config_hash
from sophon.models import DEFAULT_NORMALIZATION, build_classifier, save_checkpoint
from sophon.tracking import stage_run
from sophon.train import evaluate_accuracy, seed_everything, train_epochs
from stages.common import parser, run, setup


def model_card(config: dict, stage: str, extra: dict | None = None) -> dict:
    """The JSON card written beside every classifier checkpoint."""
    data = config["data"]
    return {"kind": "classifier", "architecture": config["model"]["arch"], "num_classes": config["model"]["num_classes"],
            "in_chans": data["channels"], "input_size": [data["channels"], data["image_size"], data["image_size"]],
            "normalization": DEFAULT_NORMALIZATION, "domains": {"original": config["original"]["domain"],
                                                               "restricted": config["restricted"]["domain"]},
            "stage": stage, "config_hash": config_hash({k: config[k] for k in ("data", "original", "restricted",
                                                                               "model", "pretrain", stage)
                                                        if k in config}), **(extra or {})}


def main() -> None:
    args = parser(__doc__).parse_args()
    config, device = setup(args)
    settings = config["pretrain"]
    manifest = layout.split_manifest()
    train, test = load_part(layout.split_part("original_train"), manifest), load_part(layout.split_part("original_test"), manifest)
    generator = seed_everything(settings["seed"])
    model = build_classifier(config["model"]["arch"], config["model"]["num_classes"], config["data"]["channels"]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    steps_per_epoch = -(-len(train) // settings["batch_size"])
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"],
                                                    total_steps=settings["epochs"] * steps_per_epoch)
    with stage_run("pretrain", config["experiment"], params={"pretrain": settings, "model": config["model"]}) as tracked:
        def on_epoch(epoch):
            tracked.log_metric("original_test_accuracy", evaluate_accuracy(model, test, device), step=epoch)

        train_epochs(model, train, optimizer, epochs=settings["epochs"], batch_size=settings["batch_size"],
                     generator=generator, device=device, scheduler=scheduler, on_epoch=on_epoch, desc="pretrain")
        accuracy = evaluate_accuracy(model, test, device)
        save_checkpoint(model.cpu(), layout.model_dir("original"),
                        model_card(config, "pretrain", {"original_test_accuracy": accuracy}))
        tracked.log_metric("final_original_accuracy", accuracy)
        tracked.log_artifact(layout.model_dir("original") / layout.CARD)
    print(f"original model: {accuracy:.2f}% on the original test set")


if __name__ == "__main__":
    run(main)
