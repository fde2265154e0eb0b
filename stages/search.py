"""Stage `search`: the strongest attacker for one starting point (sophon.search), for either task.

    python -m stages.search --experiment classification --start sophon
    python -m stages.search --experiment generation --start scratch

Writes results/search/<experiment>/<start>.json: every coarse curve and the confirmed configurations' seed
curves. One MLflow parent run per search, one nested child run per
configuration and seed (cached runs included, tagged so).
"""

import time

import torch

from sophon import layout
from sophon.data.splits import load_part
from sophon.errors import ConfigError
from sophon.io import read_json, write_json
from sophon.models import build_classifier, load_classifier
from sophon.objectives import ClassificationObjective
from sophon.search import RunCache, run_search
from sophon.tracking import stage_run
from stages import gen_common
from stages.common import parser, run, setup

EXPERIMENTS = ("classification", "generation")


def task_view(config: dict, experiment: str, start: str, device):
    """(section, objective, adversary, test, build, start digest) of one experiment: the part of the config,
    data and models the search needs, whichever task it is."""
    if experiment == "classification":
        section, manifest = config, layout.split_manifest()
        adversary, test = (load_part(layout.split_part(p), manifest) for p in ("adversary", "restricted_test"))
        objective = ClassificationObjective(device=device)
        if start == "scratch":
            model = config["model"]

            def build():
                return build_classifier(model["arch"], model["num_classes"], config["data"]["channels"]).to(device)

            return section, objective, adversary, test, build, {"scratch": model}, manifest
        folder = layout.model_dir(start)

        def build():
            fresh, _ = load_classifier(folder)
            return fresh.to(device)

        return section, objective, adversary, test, build, {"weights": read_json(folder / layout.CARD)["weights_sha256"]}, manifest
    gen = gen_common.section(config)
    adversary, test = gen_common.part("adversary"), gen_common.part("restricted_test")
    objective = gen_common.objective(gen, device)
    if start == "scratch":
        def build():
            return gen_common.new_unet(gen, torch.initial_seed()).to(device)

        return gen, objective, adversary, test, build, {"scratch": gen["unet"]}, layout.gen_split_manifest()

    def build():
        return gen_common.model(start, device)[0]

    card = read_json(layout.gen_model_dir(start) / layout.CARD)
    return gen, objective, adversary, test, build, {"weights": card["weights_sha256"]}, layout.gen_split_manifest()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--experiment", choices=EXPERIMENTS, required=True)
    p.add_argument("--start", required=True)
    args = p.parse_args()
    config, device = setup(args)
    cfg = (config if args.experiment == "classification" else config["generation"])["search"]
    if args.start not in ("scratch", *cfg["starts"]):
        raise ConfigError(f"--start {args.start!r} is not scratch nor in the {args.experiment} search's starts: "
                          f"{', '.join(cfg['starts'])}")
    section, objective, adversary, test, build, start_digest, manifest = task_view(config, args.experiment,
                                                                                  args.start, device)
    parts = read_json(manifest)["parts"]
    cache = RunCache(layout.search_cache(section["experiment"]),
                     {"start": args.start, "model": start_digest,
                      "data": {p: parts[p]["sha256"] for p in ("adversary", "restricted_test")},
                      "objective": type(objective).__name__, "lora_rank": cfg["lora_rank"]})
    out = layout.search_result(args.experiment, args.start)
    metric = "restricted_accuracy" if objective.higher_is_better else "restricted_mse"
    with stage_run("search", section["experiment"], name=f"search/{args.start}",
                   params={"start": args.start, **{k: v for k, v in cfg.items() if k != "space"}, "space": cfg["space"]},
                   tags={"sophon.start": args.start}) as tracked:
        began = time.perf_counter()
        counts = {"computed": 0, "cached": 0}

        def on_run(record):
            counts["cached" if record["cached"] else "computed"] += 1
            trial = record["trial"]
            tracked.child(f"{record['phase']}/{trial.name}/seed{record['seed']}",
                          params={**trial.__dict__, "phase": record["phase"], "seed": record["seed"]},
                          metrics={"score": record["score"]}, curve=(metric, record["curve"]),
                          tags={"sophon.cached": record["cached"], "sophon.phase": record["phase"]})

        document = run_search(build, objective, adversary, test, cfg, start=args.start, device=device, cache=cache,
                              on_run=on_run)
        seconds = time.perf_counter() - began
        document.update(experiment=section["experiment"], seconds=seconds, runs=counts)
        write_json(out, document)
        best = max(document["confirmed"].values(), key=lambda c: c["coarse_score"])
        tracked.set_tag("sophon.best_config", next(n for n, c in document["confirmed"].items() if c is best))
        tracked.log_metrics({"seconds": seconds, "runs_computed": counts["computed"], "runs_cached": counts["cached"],
                             "best_coarse_score": best["coarse_score"]})
    print(f"search {args.experiment}/{args.start}: {len(document['coarse'])} coarse configurations, "
          f"{len(document['confirmed'])} confirmed × {len(cfg['seeds'])} seeds; {counts['computed']} runs computed, "
          f"{counts['cached']} from the cache ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
