"""Stage `redteam`: the red-team suite, a fixed named list of attacks (params.yaml `redteam.attacks`), against one start.

    python -m stages.redteam --experiment quick-classification --start sophon

Every attack runs at every seed of `redteam.seeds` through the search's run cache (sophon.search.cached_finetune), so
the suite and the search mean the same fine-tuning by the same settings. Writes results/<experiment>/redteam/<start>.json:
per attack its settings, whether it is held out of every tuning, and its seed curves. The report compares each with
the search's envelope.
"""

import time
from dataclasses import asdict

from sophon import layout
from sophon.attacks import AttackSettings
from sophon.errors import ConfigError
from sophon.io import write_json
from sophon.search import cached_finetune
from sophon.tasks import task_of
from sophon.tracking import stage_run
from stages.common import fine_tuning_setup, parser, run, setup


def run_suite(exp: dict, build, cache, objective, adversary, test, device, *, start: str, tracked=None) -> dict:
    """Every attack of `redteam.attacks` at every seed of `redteam.seeds` from one start (through the search's run
    cache): per attack its settings, whether it is held out, and its seed curves."""
    task, cfg, attacks = task_of(exp), exp["redteam"], {}
    for attack, spec in cfg["attacks"].items():
        settings = AttackSettings(**{k: v for k, v in spec.items() if k != "held_out"})
        curves = []
        for seed in cfg["seeds"]:
            record, cached = cached_finetune(cache, build, settings, seed, from_scratch=False, objective=objective,
                                             adversary=adversary, test=test, device=device)
            curves.append(record["curve"])
            if tracked is not None:
                tracked.child(f"{attack}/seed{seed}", params={**asdict(settings), "seed": seed},
                              metrics={"final": record["curve"][-1]}, curve=(task.metric, record["curve"]),
                              tags={"sophon.cached": cached, "sophon.redteam": attack})
        # With sophon.select: redteam the held-out attacks also chose the released checkpoint (short probes on
        # the defender's data): the report says so.
        selects = bool(spec["held_out"] and exp["sophon"].get("select") == "redteam" and start == "sophon")
        attacks[attack] = {"settings": asdict(settings), "held_out": spec["held_out"], "seeds": list(cfg["seeds"]),
                           "selected_release": selects, "curves": curves}
    return attacks


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--start", required=True)
    args = p.parse_args()
    exp, device = setup(args)
    cfg, name = exp["redteam"], exp["name"]
    if args.start not in cfg["starts"]:
        raise ConfigError(f"--start {args.start!r} is not one of the red-team starts of {name}: {', '.join(cfg['starts'])}")
    objective, adversary, test, build, cache = fine_tuning_setup(exp, args.start, device)
    began = time.perf_counter()
    with stage_run("redteam", name, name=f"redteam/{args.start}", params={"start": args.start, "seeds": cfg["seeds"]},
                   tags={"sophon.start": args.start}) as tracked:
        attacks = run_suite(exp, build, cache, objective, adversary, test, device, start=args.start, tracked=tracked)
        seconds = time.perf_counter() - began
        tracked.log_metrics({"seconds": seconds})
    write_json(layout.redteam_result(name, args.start), {
        "experiment": name, "start": args.start, "higher_is_better": objective.higher_is_better, "seconds": seconds,
        "attacks": attacks})
    print(f"redteam {name}/{args.start}: {len(attacks)} attacks × {len(cfg['seeds'])} seeds ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
