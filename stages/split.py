"""Stage `split`: materialise the original domain and the restricted domain's defender / adversary / test parts."""

from sophon import layout
from sophon.data import DomainRequest
from sophon.data.splits import describe, make_splits, save_part, write_manifest
from sophon.tracking import stage_run
from stages.common import parser, run, setup


def main() -> None:
    args = parser(__doc__).parse_args()
    config, _ = setup(args)
    data = config["data"]
    request = DomainRequest(size=data["image_size"], channels=data["channels"], root=data["root"],
                            download=data["download"], seed=config["split"]["seed"])
    parts = make_splits(config["original"], config["restricted"], request, config["split"]["seed"])
    for name, part in parts.items():
        save_part(part, layout.split_part(name), {"part": name})
    details = {"original": describe(config["original"]["domain"]),
               "restricted": describe(config["restricted"]["domain"]),
               "sizes": {name: len(part) for name, part in parts.items()},
               "image_shape": list(parts["defender"].images.shape[1:]), "seed": config["split"]["seed"]}
    write_manifest(layout.split_manifest(), {n: layout.split_part(n) for n in parts}, details)
    with stage_run("split", config["experiment"], params={"original": config["original"],
                   "restricted": config["restricted"], "split": config["split"], "data": data}) as tracked:
        tracked.log_metrics({f"size.{name}": len(part) for name, part in parts.items()})
        tracked.log_artifact(layout.split_manifest())
    print(" ".join(f"{name}={len(part)}" for name, part in parts.items()))


if __name__ == "__main__":
    run(main)
