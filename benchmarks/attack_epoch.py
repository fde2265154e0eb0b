"""Where an attack epoch's time goes (not a test): training on the adversary's data against scoring the restricted
test set, at the quick profile's sizes, median and range over repeats.

    python benchmarks/attack_epoch.py [--repeats 5] [--threads 1] [--params params.yaml]

Needs the split data of every experiment (`make run`, or its split stages). For each experiment and batch size it
times one epoch of `sophon.train.train_epochs` (the loop every attack runs, from a fresh model) and one call of the
objective's `quality` (what `sophon.attacks.finetune` runs after every epoch), alternating the two in each repeat.
The searches are the pipeline's largest cost and are all such epochs, so the share of scoring is the part of them
that does not depend on how the attacker trains. For classification it also scores the test set in one batch (how
scoring ran before `sophon.train.SCORE_BATCH`) and checks that both give the same logits. Writes
benchmarks/results_attack_epoch.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.run import once as seconds  # noqa: E402
from sophon.config import load_params  # noqa: E402
from sophon.optim import make_optimizer  # noqa: E402
from sophon.train import SCORE_BATCH, evaluate_accuracy, to_input, train_epochs  # noqa: E402
from stages.common import experiment, fine_tuning_setup  # noqa: E402

BATCH_SIZES = {"classification": (8, 16, 64), "generation": (4, 8)}


def measure(exp: dict, batch_size: int, repeats: int) -> dict:
    device = torch.device("cpu")
    objective, adversary, test, build, _cache = fine_tuning_setup(exp, "scratch", device)
    model = build()
    optimizer = make_optimizer("adam", list(model.parameters()), 1e-3, 0.0)
    generator = torch.Generator().manual_seed(0)

    def train():
        train_epochs(model, adversary, optimizer, epochs=1, batch_size=batch_size, generator=generator,
                     device=device, loss=objective.finetune_loss, desc="benchmark")

    def score():
        objective.quality(model, test, device)

    def score_one_batch():
        evaluate_accuracy(model, test, device, batch_size=len(test))

    classification = objective.higher_is_better
    train(), score()  # warm-up
    trained, scored, one_batch = [], [], []
    for _ in range(repeats):
        trained.append(seconds(train))
        scored.append(seconds(score))
        if classification:
            one_batch.append(seconds(score_one_batch))
    shares = [s / (t + s) for t, s in zip(trained, scored)]
    out = {"adversary_images": len(adversary), "test_images": len(test),
           "train_epoch_s": trained, "score_s": scored, "score_share": shares}
    if classification:
        model.eval()
        with torch.no_grad():
            whole = model(to_input(test.images, device))
            chunked = torch.cat([model(to_input(test.images[i:i + SCORE_BATCH], device))
                                 for i in range(0, len(test), SCORE_BATCH)])
        out |= {"score_one_batch_s": one_batch, "one_batch_over_chunked": [o / s for o, s in zip(one_batch, scored)],
                "same_logits": bool(torch.equal(whole, chunked))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a pipeline job has 1)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_params(args.params)
    results = {}
    for name in config["experiments"]:
        exp = experiment(config, name, args.params)
        task = "generation" if "unet" in exp else "classification"
        for batch_size in BATCH_SIZES[task]:
            results[f"{name} batch {batch_size}"] = measure(exp, batch_size, args.repeats)

    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}

    summary = {row: {k: stats(v) if isinstance(v, list) else v for k, v in r.items()} for row, r in results.items()}
    Path(__file__).with_name("results_attack_epoch.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"threads {args.threads}, {args.repeats} repeats: median (min–max)")
    print(f"{'':40} {'train epoch s':>22} {'score s':>22} {'score share':>20} {'score in one batch s':>22} "
          f"{'one batch / chunked':>20}")

    def cell(r, key, fmt):
        if key not in r:
            return "–"
        return f"{r[key]['median']:{fmt}} ({r[key]['min']:{fmt}}–{r[key]['max']:{fmt}})"

    for row, r in summary.items():
        same = "" if "same_logits" not in r else f", same logits: {r['same_logits']}"
        print(f"{row:40} {cell(r, 'train_epoch_s', '.3f'):>22} {cell(r, 'score_s', '.3f'):>22} "
              f"{cell(r, 'score_share', '.0%'):>20} {cell(r, 'score_one_batch_s', '.3f'):>22} "
              f"{cell(r, 'one_batch_over_chunked', '.2f'):>20}"
              f"   [{r['adversary_images']} adversary, {r['test_images']} test images{same}]")


if __name__ == "__main__":
    main()
