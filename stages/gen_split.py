"""Stage `gen_split`: the generation experiment's parts — original train / val / test and the restricted
(face) domain's defender / adversary / test parts, split as in the classification pipeline."""

import torch

from sophon import layout
from sophon.data import DomainRequest
from sophon.data.splits import describe, make_splits, save_part, write_manifest
from sophon.tracking import stage_run
from stages import gen_common
from stages.common import parser, run, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    config, _ = setup(args)
    gen = gen_common.section(config, args.params)
    data, split = gen["data"], gen["split"]
    request = DomainRequest(size=data["image_size"], channels=data["channels"], root=data["root"],
                            download=data["download"], seed=split["seed"])
    parts = make_splits(gen["original"], gen["restricted"], request, split["seed"])
    # A validation part for the protect loop's rollback checks, so the reported original test MSE stays unseen.
    train = parts.pop("original_train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split["seed"]))
    held = min(split["original_val_samples"], len(train) // 2)
    parts = {"original_train": train.subset(order[held:].sort().values),
             "original_val": train.subset(order[:held].sort().values), **parts}
    for name, value in parts.items():
        save_part(value, layout.gen_split_part(name), {"part": name})
    details = {"original": describe(gen["original"]["domain"]), "restricted": describe(gen["restricted"]["domain"]),
               "sizes": {name: len(value) for name, value in parts.items()},
               "image_shape": list(parts["defender"].images.shape[1:]), "seed": split["seed"]}
    write_manifest(layout.gen_split_manifest(), {n: layout.gen_split_part(n) for n in parts}, details)
    with stage_run("gen_split", gen["experiment"], params={k: gen[k] for k in ("data", "original", "restricted", "split")}) as tracked:
        tracked.log_metrics({f"size.{name}": len(value) for name, value in parts.items()})
        tracked.log_artifact(layout.gen_split_manifest())
    print(" ".join(f"{name}={len(value)}" for name, value in parts.items()))


if __name__ == "__main__":
    run(main)
