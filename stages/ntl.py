"""Stage `ntl`: the NTL baseline (B3, classification only), trained from the original model on the defender's half.

    python -m stages.ntl --experiment quick-classification
"""

import dataclasses

from sophon import layout
from sophon.errors import ConfigError
from sophon.io import write_json
from sophon.ntl import NTLSettings, train_ntl
from sophon.tasks import load_model, task_of
from sophon.tracking import stage_run
from sophon.train import evaluate_accuracy, seed_everything
from stages.common import parser, parts, run, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    exp, device = setup(args)
    if exp["task"] != "classification":
        raise ConfigError(f"experiment {exp['name']} is a {exp['task']} experiment: NTL is a classification baseline")
    cfg, name = exp["ntl"], exp["name"]
    source, original_test, target, restricted_test = parts(exp, "original_train", "original_test", "defender",
                                                           "restricted_test")
    model, _ = load_model(exp, "original", device)
    seed_everything(cfg["seed"])
    settings = NTLSettings(**{k: cfg[k] for k in ("steps", "lr", "alpha", "beta", "batch_size")})
    with stage_run("ntl", name, params={"ntl": cfg}) as tracked:
        history = train_ntl(model, source, target, settings, seed=cfg["seed"], device=device)
        for step in range(0, len(history.loss), 10):
            tracked.log_metrics({k: getattr(history, k)[step] for k in ("loss", "kl_source", "kl_target", "mmd")}, step=step)
        metrics = {"original_test_accuracy": evaluate_accuracy(model, original_test, device),
                   "restricted_test_accuracy": evaluate_accuracy(model, restricted_test, device)}
        tracked.log_metrics(metrics)
        write_json(layout.history(name, "ntl"), {"settings": dataclasses.asdict(settings), **dataclasses.asdict(history),
                                                 **metrics})
        task_of(exp).save(model, exp, "ntl", "ntl", metrics)
        tracked.log_artifact(layout.model_dir(name, "ntl") / layout.CARD)
    print(f"NTL model: original {metrics['original_test_accuracy']:.2f}%, "
          f"restricted (before fine-tuning) {metrics['restricted_test_accuracy']:.2f}%")


if __name__ == "__main__":
    run(main)
