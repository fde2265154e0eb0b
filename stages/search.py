"""Stage `search`: the strongest attacker for one starting point (sophon.search), for either task.

    python -m stages.search --experiment quick-classification --start sophon
    python -m stages.search --experiment quick-generation --start scratch

Writes results/<experiment>/search/<start>.json: every coarse curve and the confirmed configurations' seed
curves. One MLflow parent run per search, one nested child run per configuration and seed (cached runs
included, tagged so).
"""

import tempfile
import time
from pathlib import Path

from sophon import layout
from sophon.envelope import envelope
from sophon.errors import ConfigError
from sophon.io import write_json
from sophon.report import figures
from sophon.search import run_search
from sophon.tasks import task_of
from sophon.tracking import stage_run
from stages.common import fine_tuning_setup, parser, run, setup


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--start", required=True)
    args = p.parse_args()
    exp, device = setup(args)
    task, cfg, name = task_of(exp), exp["search"], exp["name"]
    if args.start not in ("scratch", *cfg["starts"]):
        raise ConfigError(f"--start {args.start!r} is neither scratch nor one of the search's starts of {name}: "
                          f"{', '.join(cfg['starts'])}")
    objective, adversary, test, build, cache = fine_tuning_setup(exp, args.start, device)
    with stage_run("search", name, name=f"search/{args.start}",
                   params={"start": args.start, **cfg}, tags={"sophon.start": args.start}) as tracked:
        began = time.perf_counter()
        counts = {"computed": 0, "cached": 0}

        def on_run(record):
            counts["cached" if record["cached"] else "computed"] += 1
            trial = record["trial"]
            tracked.child(f"{record['phase']}/{trial.name}/seed{record['seed']}",
                          params={**trial.__dict__, "phase": record["phase"], "seed": record["seed"]},
                          metrics={"score": record["score"]}, curve=(task.metric, record["curve"]),
                          tags={"sophon.cached": record["cached"], "sophon.phase": record["phase"]})

        document = run_search(build, objective, adversary, test, cfg, start=args.start, device=device, cache=cache,
                              on_run=on_run)
        seconds = time.perf_counter() - began
        document.update(experiment=name, seconds=seconds, runs=counts)
        write_json(layout.search_result(name, args.start), document)
        best = max(document["confirmed"], key=lambda n: document["confirmed"][n]["coarse_score"])
        tracked.set_tag("sophon.best_config", best)
        with tempfile.TemporaryDirectory() as folder:  # the start's envelope, as an artifact of the parent run
            runs = {n: c["curves"] for n, c in document["confirmed"].items()}
            figure = Path(folder) / f"envelope_{args.start}.png"
            figures.envelopes({"starts": {args.start: envelope(runs, objective.higher_is_better, keep_best=True)}}, figure,
                              ylabel=task.metric.replace("_", " "), title=f"{name}: best confirmed attacker from {args.start}")
            tracked.log_artifact(figure)
        tracked.log_metrics({"seconds": seconds, "runs_computed": counts["computed"], "runs_cached": counts["cached"],
                             "best_coarse_score": document["confirmed"][best]["coarse_score"]})
    print(f"search {name}/{args.start}: {len(document['coarse'])} coarse configurations, "
          f"{len(document['confirmed'])} confirmed × {len(cfg['seeds'])} seeds; {counts['computed']} runs computed, "
          f"{counts['cached']} from the cache ({seconds:.0f} s); best: {best}")


if __name__ == "__main__":
    run(main)
