"""Stage `protect`: Sophon — make the original model non-fine-tunable on the restricted domain."""

import dataclasses

from sophon import layout
from sophon.data.splits import load_part
from sophon.io import write_json
from sophon.models import load_classifier, save_checkpoint
from sophon.objectives import ClassificationObjective
from sophon.protect import ProtectSettings, protect
from sophon.tracking import stage_run
from sophon.train import evaluate_accuracy, seed_everything
from stages.common import parser, run, setup
from stages.pretrain import model_card


def main() -> None:
    args = parser(__doc__).parse_args()
    config, device = setup(args)
    cfg = config["sophon"]
    manifest = layout.split_manifest()
    original_train, original_test, defender, restricted_test = (
        load_part(layout.split_part(p), manifest) for p in ("original_train", "original_test", "defender", "restricted_test"))
    model, _ = load_classifier(layout.model_dir("original"), device)
    seed_everything(cfg["seed"])
    fields = {f.name for f in dataclasses.fields(ProtectSettings)}
    settings = ProtectSettings(**{k: v for k, v in cfg.items() if k in fields})
    objective = ClassificationObjective(cfg["suppression"], device)
    with stage_run("protect", config["experiment"], params={"sophon": cfg}) as tracked:
        def on_check(check):
            tracked.log_metrics({"original_accuracy": check["quality"], "suppression_loss": check["suppression_loss"],
                                 "rolled_back": int(check["rolled_back"])}, step=check["loop"])

        history = protect(model, objective, defender, original_train, original_test, settings, seed=cfg["seed"],
                          device=device, on_check=on_check)
        original_acc = evaluate_accuracy(model, original_test, device)
        restricted_acc = evaluate_accuracy(model, restricted_test, device)
        tracked.log_metrics({"final_original_accuracy": original_acc, "restricted_accuracy": restricted_acc,
                             "rollbacks": history.rollbacks, "nonfinite_loops": history.nonfinite})
        write_json(layout.history("sophon"), {"settings": dataclasses.asdict(settings), **dataclasses.asdict(history),
                                              "original_accuracy": original_acc, "restricted_accuracy": restricted_acc})
        save_checkpoint(model.cpu(), layout.model_dir("sophon"),
                        model_card(config, "sophon", {"original_test_accuracy": original_acc, "suppression": cfg["suppression"]}))
        tracked.log_artifact(layout.model_dir("sophon") / layout.CARD)
    print(f"Sophon model: original {original_acc:.2f}%, restricted (before fine-tuning) {restricted_acc:.2f}%, "
          f"{history.rollbacks} rollbacks")


if __name__ == "__main__":
    run(main)
