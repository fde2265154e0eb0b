"""Stage `ntl`: the NTL baseline (B3), trained from the original model on the defender's half."""

import dataclasses

from sophon import layout
from sophon.data.splits import load_part
from sophon.io import write_json
from sophon.models import load_classifier, save_checkpoint
from sophon.ntl import NTLSettings, train_ntl
from sophon.tracking import stage_run
from sophon.train import evaluate_accuracy, seed_everything
from stages.common import parser, run, setup
from stages.pretrain import model_card


def main() -> None:
    args = parser(__doc__).parse_args()
    config, device = setup(args)
    cfg = config["ntl"]
    manifest = layout.split_manifest()
    source, original_test, target, restricted_test = (load_part(layout.split_part(p), manifest) for p in
                                                      ("original_train", "original_test", "defender", "restricted_test"))
    model, _ = load_classifier(layout.model_dir("original"), device)
    seed_everything(cfg["seed"])
    settings = NTLSettings(**{k: cfg[k] for k in ("steps", "lr", "alpha", "beta", "batch_size")})
    with stage_run("ntl", config["experiment"], params={"ntl": cfg}) as tracked:
        history = train_ntl(model, source, target, settings, seed=cfg["seed"], device=device)
        for step in range(0, len(history.loss), 10):
            tracked.log_metrics({k: getattr(history, k)[step] for k in ("loss", "kl_source", "kl_target", "mmd")}, step=step)
        original_acc = evaluate_accuracy(model, original_test, device)
        restricted_acc = evaluate_accuracy(model, restricted_test, device)
        tracked.log_metrics({"original_accuracy": original_acc, "restricted_accuracy": restricted_acc})
        write_json(layout.history("ntl"), {"settings": dataclasses.asdict(settings), **dataclasses.asdict(history),
                                           "original_accuracy": original_acc, "restricted_accuracy": restricted_acc})
        save_checkpoint(model.cpu(), layout.model_dir("ntl"), model_card(config, "ntl", {"original_test_accuracy": original_acc}))
        tracked.log_artifact(layout.model_dir("ntl") / layout.CARD)
    print(f"NTL model: original {original_acc:.2f}%, restricted (before fine-tuning) {restricted_acc:.2f}%")


if __name__ == "__main__":
    run(main)
