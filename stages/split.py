"""Stage `split`: materialise the original domain (train, test and a validation part) and the
restricted domain's defender / adversary / test parts of one experiment.

    python -m stages.split --experiment quick-classification
"""

import torch

from sophon import layout
from sophon.data import DomainRequest
from sophon.data.splits import describe, make_splits, save_part, write_manifest
from sophon.tracking import stage_run
from stages.common import parser, run, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    exp, _ = setup(args)
    data, split, name = exp["data"], exp["split"], exp["name"]
    request = DomainRequest(size=data["image_size"], channels=data["channels"], root=data["root"],
                            download=data["download"], seed=split["seed"])
    parts = make_splits(exp["original"], exp["restricted"], request, split["seed"])
    # A validation part for the protect loop's quality checks, so the reported original test metric stays unseen.
    train = parts.pop("original_train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split["seed"]))
    held = min(split["original_val_samples"], len(train) // 2)
    parts = {"original_train": train.subset(order[held:].sort().values),
             "original_val": train.subset(order[:held].sort().values), **parts}
    for part, value in parts.items():
        save_part(value, layout.split_part(name, part), {"part": part})
    details = {"original": describe(exp["original"]["domain"]), "restricted": describe(exp["restricted"]["domain"]),
               "sizes": {part: len(value) for part, value in parts.items()},
               "image_shape": list(parts["defender"].images.shape[1:]), "seed": split["seed"]}
    write_manifest(layout.split_manifest(name), {p: layout.split_part(name, p) for p in parts}, details)
    with stage_run("split", name, params={k: exp[k] for k in ("data", "original", "restricted", "split")}) as tracked:
        tracked.log_metrics({f"size.{part}": len(value) for part, value in parts.items()})
        tracked.log_artifact(layout.split_manifest(name))
    print(" ".join(f"{part}={len(value)}" for part, value in parts.items()))


if __name__ == "__main__":
    run(main)
