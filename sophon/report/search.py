"""The attack search in the report, for both tasks: the `envelope` contract of summary.json (pure) and its
report section (verdict in words, best configurations, the paper's Tables V–VII as slices, the figure)."""

from __future__ import annotations

from pathlib import Path

from sophon import envelope as env
from sophon.report.render import ROW_NAMES, Image, Section, Table
from sophon.search import lr_values

SLICES = {"optimizer": "Table V: optimiser", "lr": "Table VI: learning rate", "batch_size": "Table VII: batch size"}


def _seed_mean(curves: list[list[float]]) -> list[float]:
    return [sum(values) / len(values) for values in zip(*curves)]


def _verdict(starts: dict, higher: bool) -> dict:
    verdict = env.holds(starts["sophon"], starts["scratch"], higher)
    return {"advantage": env.advantage(starts["sophon"], starts["scratch"], higher), "holds": verdict["holds"],
            "violations": verdict["violations"]}


def summarize(docs: dict[str, dict], search: dict) -> dict:
    """The `envelope` section of summary.json from the search documents of every start (`docs[start]`)."""
    higher = next(iter(docs.values()))["higher_is_better"]
    space = search["space"]
    starts, last = {}, {}
    for start, doc in docs.items():
        runs = {name: entry["curves"] for name, entry in doc["confirmed"].items()}
        scores = {name: env.score(_seed_mean(curves), higher) for name, curves in runs.items()}
        best = max(scores, key=scores.get)
        # The verdict's envelope: every run keeps its best checkpoint so far (the attacker's early stopping).
        starts[start] = {**env.envelope(runs, higher, keep_best=True),
                         "best": best, "coarse_trials": len(doc["coarse"]), "seconds": doc.get("seconds"),
                         "best_config": doc["confirmed"][best]["config"], "best_score": scores[best]}
        last[start] = env.envelope(runs, higher)
    result = {"epochs": search["epochs"], "metric": "restricted accuracy (%)" if higher else "restricted MSE",
              "higher_is_better": higher, "checkpoint": "best so far",
              "space": {"strategies": space["strategies"], "optimizers": space["optimizers"],
                        "lrs": {o: lr_values(space["lrs"][o]) for o in space["optimizers"]},
                        "batch_sizes": space["batch_sizes"], "schedules": space["schedules"],
                        "weight_decays": space["weight_decays"]},
              "budget": {k: search[k] for k in ("trials", "coarse_epochs", "coarse_seed", "confirm_top", "seeds")},
              "starts": starts}
    if "sophon" in starts and "scratch" in starts:
        result.update(_verdict(starts, higher))
        result["spread_rule"] = env.holds(starts["sophon"], starts["scratch"], higher)["rule"]
        # The same verdict judged at the last checkpoint of every run (no early stopping), for comparison.
        result["last_checkpoint"] = _verdict(last, higher)
        target = env.default_target(starts["scratch"], higher, search["cost_target"])
        runs = {s: [(_seed_mean([env.best_so_far(c, higher) for c in entry["curves"]]), entry["steps_per_epoch"])
                    for entry in docs[s]["confirmed"].values()] for s in ("sophon", "scratch")}
        result["cost_target"] = target
        result["cost_ratio"] = env.cost_ratio(runs["sophon"], runs["scratch"], target, higher)
    result["slices"] = {axis: env.slice_table([{"start": s, "name": r["name"], "config": r["config"], "curve": r["curve"]}
                                               for s, d in docs.items() for r in d["coarse"]], axis, higher)
                        for axis in SLICES}
    return result


def verdict_line(e: dict) -> str:
    """The envelope verdict in words."""
    if "advantage" not in e:
        return "Envelope verdict: not available (the search needs both the scratch and the Sophon start)."
    a, unit = e["advantage"], "points" if e["higher_is_better"] else "MSE"
    ratio = ("no ratio: Sophon or scratch never reaches it" if e["cost_ratio"] is None
             else f"Sophon needs {e['cost_ratio']:.2f}× the attacker steps of scratch")
    target = f"{e['cost_target']:.1f}%" if e["higher_is_better"] else f"MSE {e['cost_target']:.4f}"
    if e["holds"]:
        line = (f"Envelope verdict: protection HOLDS against the strongest searched attacker over {e['epochs']} epochs: "
                f"at no epoch does fine-tuning Sophon beat training from scratch by more than the seeds' spread "
                f"(largest gain {a['value']:+.4g} {unit} at epoch {a['epoch']}). Cost to reach {target}: {ratio}.")
    else:
        line = (f"Envelope verdict: protection does NOT hold against the strongest searched attacker: fine-tuning "
                f"Sophon beats training from scratch beyond the seeds' spread at epochs {_epochs(e['violations'])} "
                f"(largest gain {a['value']:+.4g} {unit} at epoch {a['epoch']}). Cost to reach {target}: {ratio}.")
    last = e.get("last_checkpoint")
    if last is not None:
        line += (" Every run keeps its best checkpoint so far; judged at each run's last checkpoint instead, it "
                 + ("holds too" if last["holds"] else f"does not hold at epochs {_epochs(last['violations'])}")
                 + f" (largest gain {last['advantage']['value']:+.4g} {unit} at epoch {last['advantage']['epoch']}).")
    return line


def _epochs(epochs: list[int]) -> str:
    return ", ".join(str(x) for x in epochs[:12]) + (" …" if len(epochs) > 12 else "")


def _fmt(value: float, higher: bool) -> str:
    return f"{value:.1f}" if higher else f"{value:.4f}"


def section(e: dict, figure: Path, epochs: list[int]) -> Section:
    """The report section of the attack search."""
    higher = e["higher_is_better"]
    blocks = [verdict_line(e), f"Spread rule: {e.get('spread_rule', 'n/a')}",
              f"Every start searched the same space with the same budget: {e['budget']['trials']} configurations "
              f"× {e['budget']['coarse_epochs']} epochs at seed {e['budget']['coarse_seed']} (a balanced subsample of "
              f"the grid; from scratch the strategy axis does not apply), then its best {e['budget']['confirm_top']} "
              f"at seeds {e['budget']['seeds']} for {e['epochs']} epochs. The envelope is, at each epoch, the best "
              f"confirmed configuration's mean ± std over the seeds of the best checkpoint each run holds by then. Score = area under the curve (mean over epochs 1…E"
              f"{'' if higher else ', negated MSE'})."]
    shown = [x for x in epochs if x <= e["epochs"]]
    rows = []
    for start, s in e["starts"].items():
        cells = [f"{_fmt(s['mean'][x], higher)} ± {_fmt(s['std'][x], higher)}" for x in shown]
        rows.append([ROW_NAMES.get(start, start), s["best"], _fmt(s["best_score"], True), *cells])
    blocks.append(Table(["start", "best configuration", "score", *[f"epoch {x}" for x in shown]], rows,
                        f"The envelope per start ({e['metric']}, mean ± std over seeds)."))
    if "advantage" in e:
        gains = e["advantage"]["per_epoch"]
        cells = [f"{gains[x]:+.4g}" for x in shown]
        blocks.append(Table(["", *[f"epoch {x}" for x in shown]], [["Sophon − scratch (attacker's gain)", *cells]],
                            "Positive: fine-tuning the Sophon model beats training from scratch."))
    blocks.append(Image(figure, "The attacker's envelope per start"))
    for axis, title in SLICES.items():
        table = e["slices"][axis]
        values = sorted({v for per in table.values() for v in per}, key=lambda v: (isinstance(v, str), v))
        rows = [[ROW_NAMES.get(start, start), *[_fmt(per[v]["score"], True) if v in per else "–" for v in values]]
                for start, per in table.items()]
        blocks.append(Table(["start", *[str(v) for v in values]], rows,
                            f"{title}: the best coarse score at each value, over all other axes."))
    return Section("The strongest attacker (attack search)", blocks)


def build(search: dict, experiment: str, out_dir: Path, epochs: list[int]) -> tuple[dict, Section, Path]:
    """Read every start's search result, summarise it, draw the envelope figure; return (envelope, section, figure).
    The section's table shows the report's epochs plus every 10th up to the long horizon."""
    from sophon import layout
    from sophon.report import figures
    from sophon.report.aggregate import read_input

    docs = {start: read_input(layout.search_result(experiment, start)) for start in ["scratch", *search["starts"]]}
    summary = summarize(docs, search)
    figure = Path(out_dir) / "envelope.png"
    figures.envelopes(summary, figure, ylabel=summary["metric"],
                      title=f"Attacker's envelope, {experiment}")
    shown = sorted({*epochs, *range(10, search["epochs"] + 1, 10)})
    return summary, section(summary, figure, shown), figure
