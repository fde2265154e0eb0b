"""Stage `ablation`: which of the protect stage's changes from the paper make the protection hold. Each variant
of the experiment's `ablation.variants` (overrides of its `sophon` section) protects the original model, then meets
the Sophon start's attack search (the same design, budget and seeds as the pipeline's) and the red-team suite, and is
judged against the pipeline's searches from scratch and from the original. `--table` puts the variants and the
pipeline's own Sophon model side by side.

    python -m stages.ablation --experiment quick-classification --variant paper
    python -m stages.ablation --experiment quick-classification --variant paper --retest
    python -m stages.ablation --experiment quick-classification --table

`--retest` judges a variant that already ran at the config's current `search.retest_seeds`, without protecting again:
its saved model meets the same search, whose run cache serves every picking run, so only the new retests train.
Set the seeds, `make run` (the pipeline's searches retest there too), then retest each variant.

Not part of `snakemake` (the default target): `snakemake ablation` runs it, `dvc repro workflow/ablation/dvc.yaml` too.
"""

import dataclasses
import time

from sophon import envelope as env
from sophon import layout
from sophon.errors import ConfigError
from sophon.features import stage_readout
from sophon.io import read_json, write_json, write_text
from sophon.protect import protect
from sophon.report.search import claimed, majority_share, restricted_chance, summarize
from sophon.search import run_search
from sophon.tasks import load_model, task_of
from sophon.tracking import stage_run
from sophon.train import seed_everything
from stages.common import parser, parts, run, run_cache, setup, start_builder
from stages.protect import protect_settings, protect_variant
from stages.redteam import run_suite

AT_EPOCHS = (1, 2, 3, 4, 5, 20, 50)  # the table's epochs: diffusion's goal is on every epoch 1-5


def at_epochs(values: list) -> dict:
    """The values at the table's epochs (AT_EPOCHS) that the list reaches, keyed by the epoch as a string."""
    return {str(k): values[k] for k in AT_EPOCHS if k < len(values)}


def quality_name(task) -> str:
    """The key of the original-domain quality on checkpoint cards: accuracy or MSE."""
    return "accuracy" if task.metric.endswith("accuracy") else "mse"


# What `judged` writes into a variant's result: the verdict, judged again by --retest and --table.
VERDICT_KEYS = ("holds", "violations", "max_gain", "removed_at", "max_gain_epoch", "holds_last_checkpoint", "gain_at",
                "cost_ratio", "best_config", "without_constant_answer", "retest", "redteam", "worst_removed_at")


def judged(exp: dict, sophon_doc: dict, scratch: dict, original: dict | None = None,
           redteam: dict | None = None, chance: float | None = None) -> dict:
    """The envelope verdict of a Sophon search against the pipeline's search from scratch (`scratch`), and with the
    original's search the share of its head start removed. With the red-team suite's attacks on the same model
    (`redteam`, as stages.redteam.run_suite returns them): the attacks the envelope does not cover and those beyond
    scratch, judged as the report judges them (against the retest's envelopes at the held-out seeds when the search
    has a retest), and the share removed against the worst case (at each epoch the stronger of the envelope and
    every attack). With `chance` (the report's chance level) the envelopes hold the constant-answer attacker
    (report.search.summarize), and `without_constant_answer` keeps the verdict without it: whether it holds, the
    epochs it fails and, of those, the ones at or below the chance level (`at_chance`)."""
    docs = {"scratch": scratch, "sophon": sophon_doc, **({"original": original} if original else {})}
    e = summarize(docs, exp["search"], {"sophon": {"attacks": redteam}} if redteam else None, chance=chance)
    gains, removed = e["advantage"]["per_epoch"], e.get("removed") or []
    result = {"holds": e["holds"], "violations": e["violations"], "max_gain": e["advantage"]["value"],
              "removed_at": at_epochs(removed),
              "max_gain_epoch": e["advantage"]["epoch"], "holds_last_checkpoint": e["last_checkpoint"]["holds"],
              "gain_at": at_epochs(gains), "cost_ratio": e["cost_ratio"],
              "best_config": e["starts"]["sophon"]["best"], **plain_verdict(e)}
    r = e.get("retest")
    if r and "advantage" in r:  # the same verdict at the search's held-out seeds (the report's claim)
        result["retest"] = {"seeds": r["seeds"], "holds": r["holds"], "violations": r["violations"],
                            **plain_verdict(r),
                            "max_gain": r["advantage"]["value"], "max_gain_epoch": r["advantage"]["epoch"],
                            "gain_at": at_epochs(r["advantage"]["per_epoch"]),
                            "removed_at": at_epochs(r.get("removed") or [])}
    if redteam:
        checks = claimed(e)[0]["redteam"]["sophon"]
        result["redteam"] = {"attacks": len(checks),
                             "uncovered": [a for a, c in checks.items() if not c["vs_envelope"]["covered"]],
                             "above_scratch": [a for a, c in checks.items() if not c["vs_scratch"]["covered"]]}
        if "original" in e["starts"]:
            worst = worst_case(e["starts"]["sophon"], [c["vs_envelope"]["mean"] for c in checks.values()],
                               e["higher_is_better"])
            worst_removed = env.removed(e["starts"]["original"], e["starts"]["scratch"], worst, e["higher_is_better"])
            result["worst_removed_at"] = at_epochs(worst_removed)
    return result


def plain_verdict(e: dict) -> dict:
    """`judged`'s record of the verdict without the constant-answer attacker, when the summary has one."""
    plain = e.get("without_constant_answer")
    if plain is None:
        return {}
    return {"without_constant_answer": {"holds": plain["holds"], "violations": plain["violations"],
                                        "at_chance": plain["at_chance"], "max_gain": plain["advantage"]["value"]}}


def worst_case(envelope: dict, attack_means: list[list[float]], higher_is_better: bool) -> dict:
    """The envelope with, at each epoch, the attacker's best of its mean and every attack's seed mean (best
    checkpoint so far) in its place; the envelope's std is kept."""
    pick = max if higher_is_better else min
    mean = [pick([m, *(a[k] for a in attack_means if k < len(a))]) for k, m in enumerate(envelope["mean"])]
    return {**envelope, "mean": mean}


def variant_changes(exp: dict, variant: str) -> dict:
    """The overrides of the experiment's `sophon` section that `variant` names."""
    variants = exp["ablation"]["variants"]
    if variant not in variants:
        raise ConfigError(f"--variant {variant!r} is not in {exp['name']}.ablation.variants: {', '.join(variants)}")
    return variants[variant]


def run_variant(exp: dict, variant: str, device) -> None:
    task, name = task_of(exp), exp["name"]
    changes = variant_changes(exp, variant)
    original_train, original_val, original_test, defender, adversary, restricted_test = parts(
        exp, "original_train", "original_val", "original_test", "defender", "adversary", "restricted_test")
    model, card = load_model(exp, "original", device)
    cfg = {**exp["sophon"], **changes}
    seed_everything(cfg["seed"])
    settings = protect_settings(exp, **changes)
    label = protect_variant(exp, settings, cfg)
    objective = task.objective({**exp, "sophon": cfg}, device)
    with stage_run("ablation", name, name=f"ablation/{variant}", params={"variant": variant, **changes},
                   tags={"sophon.variant": label}) as tracked:
        began = time.perf_counter()
        history = protect(model, objective, defender, original_train, original_val, settings, seed=cfg["seed"],
                          device=device)
        protect_seconds = time.perf_counter() - began
        intact = {"original": card.get(f"original_test_{quality_name(task)}"),
                  "protected": objective.quality(model, original_test, device)}
        readout = {"readout": stage_readout(model, restricted_test, device)} if task.name == "classification" else {}
        start = layout.ablation_model(name, variant)
        task.save(model, exp, start, "sophon", {"variant": label, "selected_loop": history.selected_loop,
                                               "protect_settings": dataclasses.asdict(settings)})
        began = time.perf_counter()
        build, cache = start_builder(exp, start, device), run_cache(exp, start, objective)
        document = run_search(build, objective, adversary, restricted_test, exp["search"], start="sophon",
                              device=device, cache=cache)
        document.update(experiment=name, seconds=time.perf_counter() - began)
        redteam = (run_suite(exp, build, cache, objective, adversary, restricted_test, device, start="sophon")
                   if exp["redteam"]["attacks"] else None)
        result = {"variant": variant, "name": label, "changes": changes, "protect_seconds": protect_seconds,
                  "search_seconds": document["seconds"], "selected_loop": history.selected_loop,
                  "averaged_loops": history.averaged_loops,
                  "intactness": intact, "search": document, "redteam_attacks": redteam, **readout,
                  **judged(exp, document, *pipeline_searches(name), redteam, chance_level(exp, restricted_test))}
        tracked.log_metrics({"protect_seconds": protect_seconds, "max_gain": result["max_gain"],
                             **{f"gain_at_{k}": v for k, v in result["gain_at"].items()}})
        write_json(layout.ablation_result(name, variant), result)
    print(f"ablation {name}/{variant} ({label}): protection {'holds' if result['holds'] else 'does NOT hold'}, "
          f"largest gain {result['max_gain']:+.4g} at epoch {result['max_gain_epoch']}")


def chance_level(exp: dict, restricted_test=None) -> float | None:
    """The restricted test set's majority-class share (classification), as the report names it; None for diffusion.
    From `restricted_test` when it is loaded already, else from the split."""
    if task_of(exp).name != "classification":
        return None
    return majority_share(restricted_test.labels) if restricted_test is not None else restricted_chance(exp["name"])


def pipeline_redteam(exp: dict) -> dict | None:
    """The pipeline's red-team suite against its Sophon release (its attacks), when the experiment has one."""
    path = layout.redteam_result(exp["name"], "sophon")
    return read_json(path)["attacks"] if exp["redteam"]["attacks"] and path.exists() else None


def pipeline_searches(name: str) -> tuple[dict, dict | None]:
    """The pipeline's searches from scratch and (when it ran) from the original model."""
    original = layout.search_result(name, "original")
    return read_json(layout.search_result(name, "scratch")), read_json(original) if original.exists() else None


WORST_AT = (1, 2, 3, 4, 5)


def redteam_cell(check: dict | None) -> str:
    if not check:
        return "–"
    uncovered, above = check["uncovered"], check["above_scratch"]
    return (f"{', '.join(uncovered) or 'none'} / {', '.join(above) or 'none'} (of {check['attacks']})")


def worst_cell(removed: dict | None) -> str:
    if not removed:
        return "–"
    return " / ".join(f"{removed[str(k)]:.0%}" if removed.get(str(k)) is not None else "–" for k in WORST_AT)


def table(exp: dict) -> None:
    """results/<experiment>/ablation.{md,json}: every variant, and the pipeline's released Sophon model."""
    task, name = task_of(exp), exp["name"]
    scratch, original_search = pipeline_searches(name)
    rows = [read_json(layout.ablation_result(name, v)) for v in exp["ablation"]["variants"]]
    chance = chance_level(exp)
    # judged again here, so the table follows the current verdict rules and the pipeline's current searches
    rows = [rejudged(exp, row, row["search"], scratch, original_search, chance) for row in rows]
    card = read_json(layout.model_dir(name, "sophon") / layout.CARD)
    history = read_json(layout.history(name, "sophon"))
    original = read_json(layout.model_dir(name, "original") / layout.CARD)
    rows.append({"variant": "pipeline (params.yaml)", "name": card.get("variant", "paper"),
                 "protect_seconds": history["seconds"], "selected_loop": card.get("selected_loop"),
                 "intactness": {"original": original.get(f"original_test_{quality_name(task)}"),
                                "protected": card.get(f"original_test_{quality_name(task)}")},
                 **judged(exp, read_json(layout.search_result(name, "sophon")), scratch, original_search,
                          pipeline_redteam(exp), chance)})
    for row in rows:
        row.pop("search", None)
        row.pop("redteam_attacks", None)
    quality = quality_name(task)
    unit = "points" if quality == "accuracy" else "MSE"
    lines = [f"# Ablation: {name}", "",
             f"Each variant protects the same original model, then meets the same attack search as the pipeline's "
             f"Sophon start; gains are Sophon − scratch in {task.metric.replace('_', ' ')} ({unit}, "
             f"positive = Sophon helps the attacker), envelopes keep each run's best checkpoint so far. Removed: the "
             f"share of the original model's head start over scratch that the variant takes away (1 = as hard as "
             f"scratch; '–' where the head start is within the spread).", "",
             "| variant | changes from the paper | holds (epochs it fails) | holds (last checkpoint) | "
             + " | ".join(f"gain at {k}" for k in AT_EPOCHS) + " | "
             + " | ".join(f"removed at {k}" for k in AT_EPOCHS)
             + f" | largest gain (epoch) | red team: not covered / beyond scratch | removed, worst case with the red "
             f"team, at {', '.join(str(k) for k in WORST_AT)} | original-domain {quality} (original → protected) | "
             f"protect time |",
             "|---|---|---|---|" + "---|" * 2 * len(AT_EPOCHS) + "---|---|---|---|---|"]
    for r in rows:
        at, removed = r["gain_at"], r.get("removed_at", {})
        holds = "yes" if r["holds"] else f"no ({len(r['violations'])})"
        holds += plain_cell(r)
        if r.get("retest"):
            holds += f"; at held-out seeds {'yes' if r['retest']['holds'] else 'no (%d)' % len(r['retest']['violations'])}"
            holds += plain_cell(r["retest"])
            if r["retest"]["seeds"] is None:  # its retest ran at other seeds than the pipeline's: judged across them
                holds += " (other seeds than the pipeline's: --retest)"
        lines.append(f"| {r['variant']} | {r['name']} | {holds} | "
                     f"{'yes' if r['holds_last_checkpoint'] else 'no'} | "
                     + "".join(f"{at[str(k)]:+.4g} | " if str(k) in at else "– | " for k in AT_EPOCHS)
                     + "".join(f"{removed[str(k)]:.0%} | " if removed.get(str(k)) is not None else "– | "
                               for k in AT_EPOCHS)
                     + f"{r['max_gain']:+.4g} ({r['max_gain_epoch']}) | {redteam_cell(r.get('redteam'))} | "
                     f"{worst_cell(r.get('worst_removed_at'))} | "
                     f"{r['intactness']['original']:.4g} → {r['intactness']['protected']:.4g} | "
                     f"{r['protect_seconds']:.0f} s |")
    write_json(layout.ablation_table(name).with_suffix(".json"), {"experiment": name, "rows": rows})
    write_text(layout.ablation_table(name), "\n".join(lines) + "\n")
    print("\n".join(lines))


def plain_cell(verdict: dict) -> str:
    """What the table adds where the verdict without the constant-answer attacker differs: its failing epochs."""
    plain = verdict.get("without_constant_answer")
    if not plain or plain["holds"] == verdict["holds"]:
        return ""
    at = " at chance" if plain["at_chance"] == plain["violations"] else ""
    return f" (without the constant answer: no, epochs {', '.join(map(str, plain['violations']))}{at})"


def retestable(exp: dict, variant: str) -> dict:
    """The saved result of `variant`, when its model can be judged again: it ran, under the settings it has now."""
    name, changes = exp["name"], variant_changes(exp, variant)
    if not exp["search"].get("retest_seeds"):
        raise ConfigError(f"--retest: key '{name}.search.retest_seeds' is empty: name the seeds to judge at")
    path = layout.ablation_result(name, variant)
    if not path.exists():
        raise ConfigError(f"--retest: {name}.ablation.variants.{variant} has not run (no {path}): run it without "
                          f"--retest first")
    row = read_json(path)
    if row["changes"] != changes:
        raise ConfigError(f"--retest: key '{name}.ablation.variants.{variant}' changed since its model was protected "
                          f"({row['changes']} then): run it without --retest")
    return row


def rejudged(exp: dict, row: dict, document: dict, scratch: dict, original: dict | None,
             chance: float | None) -> dict:
    """`row` (a variant's saved result) with the search `document` in place of its own and the verdict judged again,
    with the red-team attacks it met; the protect run's numbers (time, intactness, readout) stay."""
    kept = {k: v for k, v in row.items() if k not in VERDICT_KEYS}
    return {**kept, "search": document, "search_seconds": document.get("seconds"),
            **judged(exp, document, scratch, original, row.get("redteam_attacks"), chance)}


def retest_variant(exp: dict, variant: str, device) -> None:
    """Search the saved model of `variant` again at the config's retest seeds (stages.ablation --retest)."""
    task, name = task_of(exp), exp["name"]
    row = retestable(exp, variant)
    adversary, restricted_test = parts(exp, "adversary", "restricted_test")
    objective = task.objective({**exp, "sophon": {**exp["sophon"], **row["changes"]}}, device)
    start = layout.ablation_model(name, variant)
    seeds = list(exp["search"]["retest_seeds"])
    with stage_run("ablation", name, name=f"ablation/{variant}/retest", params={"variant": variant,
                                                                            "retest_seeds": seeds}) as tracked:
        began = time.perf_counter()
        document = run_search(start_builder(exp, start, device), objective, adversary, restricted_test,
                              exp["search"], start="sophon", device=device, cache=run_cache(exp, start, objective))
        document.update(experiment=name, seconds=time.perf_counter() - began)
        result = rejudged(exp, row, document, *pipeline_searches(name), chance_level(exp, restricted_test))
        retest = result["retest"]
        plain = retest.get("without_constant_answer")
        tracked.log_metrics({"retest_holds": float(retest["holds"]), "retest_max_gain": retest["max_gain"],
                             **({"retest_holds_without_constant_answer": float(plain["holds"])} if plain else {})})
        write_json(layout.ablation_result(name, variant), result)
    same = {k: e["curves"] for k, e in document["confirmed"].items()} == {
        k: e["curves"] for k, e in row["search"]["confirmed"].items()}
    print(f"ablation {name}/{variant}: retest at seeds {retest['seeds'] or seeds}: protection "
          f"{'holds' if retest['holds'] else 'does NOT hold'}, largest gain {retest['max_gain']:+.4g} at epoch "
          f"{retest['max_gain_epoch']}"
          + ("" if same else " (the picking runs differ from the variant's first search: the search design changed)"))


def main() -> None:
    p = parser(__doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--variant", help="one variant of the experiment's ablation.variants")
    which.add_argument("--table", action="store_true", help="collect the variants into one table")
    p.add_argument("--retest", action="store_true",
                   help="with --variant: judge its saved model at the current search.retest_seeds, not protect again")
    args = p.parse_args()
    if args.retest and args.table:
        p.error("--retest goes with --variant, not --table")
    exp, device = setup(args)
    if args.table:
        table(exp)
    elif args.retest:
        retest_variant(exp, args.variant, device)
    else:
        run_variant(exp, args.variant, device)


if __name__ == "__main__":
    run(main)
