"""Suppression at depth against a deep re-initialisation (issue 15), a measurement, not a test: protect the
quick-classification experiment's original model with its `sophon` settings (fewer loops) at each depth weight,
then fine-tune every released model with the red-team recipe reinit2+all (Adam 1e-3, batch 64, cosine with one
warm-up epoch, 5 epochs) and record restricted accuracy per epoch and original-domain accuracy.

    python benchmarks/depth_suppression.py --run /work/run1 --weight 0 --loops 100 --out depth-0.json

`--run` is a project folder whose data/<experiment> split and models/<experiment>/original exist (read only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sophon.attacks import AttackSettings, finetune  # noqa: E402
from sophon.config import experiment, load_params  # noqa: E402
from sophon.data.splits import load_part  # noqa: E402
from sophon.models import load_classifier  # noqa: E402
from sophon.objectives import ClassificationObjective  # noqa: E402
from sophon.protect import protect, variant_name  # noqa: E402
from sophon.train import evaluate_accuracy  # noqa: E402
from stages.protect import protect_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--experiment", default="quick-classification")
    ap.add_argument("--weight", type=float, default=0.0)
    ap.add_argument("--at", default="released")
    ap.add_argument("--stages", default="all")
    ap.add_argument("--loops", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    exp = experiment(load_params(Path(__file__).resolve().parent.parent / "params.yaml"), args.experiment)
    data = args.run / "data" / args.experiment
    part = {name: load_part(data / f"{name}.safetensors", data / "manifest.json") for name in
            ("original_train", "original_val", "original_test", "defender", "adversary", "restricted_test")}
    model, _ = load_classifier(args.run / "models" / args.experiment / "original")
    settings = protect_settings(exp, loops=args.loops, save_every=0,
                                depth={"weight": args.weight, "at": args.at, "stages": args.stages})
    objective = ClassificationObjective(exp["sophon"]["suppression"], device)
    torch.manual_seed(exp["sophon"]["seed"])
    began = time.perf_counter()
    history = protect(model, objective, part["defender"], part["original_train"], part["original_val"], settings,
                      seed=exp["sophon"]["seed"], device=device)
    protect_seconds = time.perf_counter() - began
    result = {"variant": variant_name(settings, None, exp["sophon"]["suppression"]), "loops": args.loops,
              "protect_seconds": protect_seconds, "selected_loop": history.selected_loop,
              "rollbacks": history.rollbacks, "depth_loss": history.depth_loss[::10],
              "original_test_accuracy": evaluate_accuracy(model, part["original_test"], device),
              "restricted_test_accuracy": evaluate_accuracy(model, part["restricted_test"], device)}
    attack = AttackSettings(strategy="reinit2+all", optimizer="adam", lr=1e-3, batch_size=64, schedule="cosine",
                            warmup_epochs=1, epochs=args.epochs)
    result["reinit2_restricted_accuracy"] = finetune(model, part["adversary"], part["restricted_test"], attack,
                                                     seed=0, device=device, objective=objective)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
