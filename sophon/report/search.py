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


def _verdict(starts: dict, higher: bool, chance: float | None = None) -> dict:
    """Sophon against scratch. With `chance` (the restricted test set's majority-class share, %), `at_chance` lists
    the failing epochs where Sophon's envelope is at or below it: there the attacker's best model scores no more than
    one answer for every image would. (`summarize` judges the envelopes with that answer in them; this keyword
    names what the verdict without it fails on.)"""
    verdict = env.holds(starts["sophon"], starts["scratch"], higher)
    out = {"advantage": env.advantage(starts["sophon"], starts["scratch"], higher), "holds": verdict["holds"],
           "violations": verdict["violations"]}
    if chance is not None:
        out["at_chance"] = [x for x in verdict["violations"] if starts["sophon"]["mean"][x] <= chance]
    return out


def _judge(starts: dict, higher: bool, redteam: dict | None, searched: dict | None = None) -> dict:
    """The verdicts one set of envelopes gives: Sophon against scratch, the original's head start and the share of it
    removed, and whether each red-team attack is covered and beats scratch. With `searched` (the envelopes without
    the constant-answer attacker), each attack also says whether it beats that scratch envelope."""
    out = {}
    if "sophon" in starts and "scratch" in starts:
        out.update(_verdict(starts, higher))
    if "original" in starts and "scratch" in starts:
        out["head_start"] = env.head_start(starts["original"], starts["scratch"], higher)
        out["something_to_protect"] = out["head_start"]["something_to_protect"]
        if "sophon" in starts:
            out["removed"] = env.removed(starts["original"], starts["scratch"], starts["sophon"], higher)
    if redteam:
        out["redteam"] = {start: {name: {**{k: attack[k] for k in ("settings", "held_out", "seeds")},
                                         "selected_release": attack.get("selected_release", False),
                                         "vs_envelope": env.covers(starts[start], attack["curves"], higher),
                                         "vs_scratch": env.covers(starts["scratch"], attack["curves"], higher),
                                         **({"beats_searched_scratch_at": env.covers(
                                             searched["scratch"], attack["curves"], higher)["violations"]}
                                            if searched else {})}
                                  for name, attack in doc["attacks"].items()}
                          for start, doc in redteam.items() if start in starts}
    return out


def _judged_with_constant_answer(searched: dict, higher: bool, redteam: dict | None,
                                 chance: float | None) -> tuple[dict, dict]:
    """The envelopes with the constant-answer attacker in them (env.with_constant_answer; with `chance` only) and
    their verdicts (`_judge`), plus the verdict of the `searched` envelopes alone as `without_constant_answer`."""
    if chance is None:
        return searched, _judge(searched, higher, redteam)
    starts = {start: env.with_constant_answer(e, chance, higher) for start, e in searched.items()}
    verdicts = _judge(starts, higher, redteam, searched)
    if "sophon" in searched and "scratch" in searched:
        verdicts["without_constant_answer"] = _verdict(searched, higher, chance)
    return starts, verdicts


def summarize(docs: dict[str, dict], search: dict, redteam: dict[str, dict] | None = None, *,
              chance: float | None = None) -> dict:
    """The `envelope` section of summary.json from the search documents of every start (`docs[start]`) and the
    red-team suite's documents (`redteam[start]`, optional). `chance`: the restricted test set's majority-class
    share in % (classification), kept as `chance_level`: every start's envelope then holds the attacker that answers
    that class for every image (env.with_constant_answer), a model-free answer any attacker has, and the verdicts
    judged without it are kept under `without_constant_answer`."""
    higher = next(iter(docs.values()))["higher_is_better"]
    space = search["space"]
    starts, last = {}, {}
    for start, doc in docs.items():
        runs = {name: entry["curves"] for name, entry in doc["confirmed"].items()}
        scores = {name: env.score(_seed_mean(curves), higher) for name, curves in runs.items()}
        longest = max(len(curves[0]) for curves in runs.values())
        best = max((n for n in scores if len(runs[n][0]) == longest), key=scores.get)
        # The verdict's envelope: every run keeps its best checkpoint so far (the attacker's early stopping).
        starts[start] = {**env.envelope(runs, higher, keep_best=True),
                         "best": best, "tried": doc.get("tried", len(doc["coarse"])),
                         "coarse_trials": len(doc["coarse"]), "seconds": doc.get("seconds"),
                         "confirmed": {n: {"chosen_for": e.get("chosen_for", []), "horizon": len(runs[n][0]) - 1}
                                       for n, e in doc["confirmed"].items()},
                         "best_config": doc["confirmed"][best]["config"], "best_score": scores[best]}
        last[start] = env.envelope(runs, higher)
    searched = starts
    starts, verdicts = _judged_with_constant_answer(searched, higher, redteam, chance)
    if chance is not None:
        last = {start: env.with_constant_answer(e, chance, higher) for start, e in last.items()}
    result = {"epochs": search["epochs"], "metric": "restricted accuracy (%)" if higher else "restricted MSE",
              "higher_is_better": higher, "checkpoint": "best so far",
              "space": {"strategies": space["strategies"], "optimizers": space["optimizers"],
                        "lrs": {o: lr_values(space["lrs"][o]) for o in space["optimizers"]},
                        "batch_sizes": space["batch_sizes"], "schedules": space["schedules"],
                        "weight_decays": space["weight_decays"], "preparations": space.get("preparations", ["none"]),
                        "shrink_perturb": space.get("shrink_perturb", [])},
              "budget": {k: search[k] for k in ("trials", "halving", "coarse_epochs", "candidate_epochs", "coarse_seed",
                                                "confirm_top", "candidate_top", "seeds") if k in search},
              "starts": starts}
    if chance is not None:
        result["chance_level"] = chance
    result.update(verdicts)
    if "sophon" in starts and "scratch" in starts:
        result["spread_rule"] = env.holds(starts["sophon"], starts["scratch"], higher)["rule"]
        # The same verdict judged at the last checkpoint of every run (no early stopping), for comparison.
        result["last_checkpoint"] = _verdict(last, higher)
        target = env.default_target(starts["scratch"], higher, search["cost_target"])
        runs = {s: [(_seed_mean([env.best_so_far(c, higher) for c in entry["curves"]]), entry["steps_per_epoch"])
                    for entry in docs[s]["confirmed"].values()] for s in ("sophon", "scratch")}
        result["cost_target"] = target
        result["cost_ratio"] = env.cost_ratio(runs["sophon"], runs["scratch"], target, higher)
    if all("retest" in doc for doc in docs.values()):
        retested = {start: env.retest(searched[start], doc["retest"]["runs"], higher) for start, doc in docs.items()}
        seeds = {tuple(doc["retest"]["seeds"]) for doc in docs.values()}
        retested, verdicts = _judged_with_constant_answer(retested, higher, redteam, chance)
        result["retest"] = {"seeds": list(seeds.pop()) if len(seeds) == 1 else None, "starts": retested, **verdicts}
    result["slices"] = {axis: env.slice_table([{"start": s, "name": r["name"], "config": r["config"], "curve": r["curve"]}
                                               for s, d in docs.items() for r in d["coarse"] if len(r["curve"]) > 1],
                                              axis, higher)
                        for axis in SLICES}
    return result


REMOVED_EPOCHS = (1, 2, 5, 20, 50)  # the epochs whose share of the head start removed the report names


def removed_shares(e: dict) -> list[tuple[int, float]]:
    """(epoch, share removed) at REMOVED_EPOCHS, where the head start is beyond the spread."""
    removed = e.get("removed") or []
    return [(x, removed[x]) for x in REMOVED_EPOCHS if x < len(removed) and removed[x] is not None]


def head_start_line(e: dict) -> str:
    """Whether there was something to protect, in words."""
    if "head_start" not in e:
        return "Head start: not measured (the search needs the original and the scratch start)."
    h, unit = e["head_start"], "points" if e["higher_is_better"] else "MSE"
    if not h["something_to_protect"]:
        return (f"Head start: NONE beyond the seeds' spread: under the search, fine-tuning the original (unprotected) "
                f"model is no better than training from scratch at any epoch (largest difference {h['value']:+.4g} "
                f"{unit} at epoch {h['epoch']}). This test bed has nothing to protect, so a verdict that the protection "
                f"holds says nothing about the protection.")
    epochs = h["beyond_spread"]
    line = (f"Head start: the original model gives the attacker up to {h['value']:+.4g} {unit} over training from scratch "
            f"(epoch {h['epoch']}), beyond the seeds' spread at {len(epochs)} epochs ({_epochs(epochs)}): there is "
            f"something to protect.")
    shown = removed_shares(e)
    if shown:
        line += (" Share of it Sophon removes (1 = all, as hard as scratch; 0 = none): "
                 + ", ".join(f"epoch {x}: {share:.0%}" for x, share in shown) + ".")
    return line


def claimed(e: dict) -> tuple[dict, list[int] | None]:
    """The envelope summary whose verdicts are the claim, and the seeds it was measured at: the retest's (each
    epoch's pick run again at held-out seeds) when the search has one, else the picking seeds' own."""
    r = e.get("retest")
    if not r:
        return e, None
    return {**e, **{k: v for k, v in r.items() if k not in ("seeds", "starts")}}, r["seeds"]


def in_short(e: dict, intactness: str, paper_rule: str) -> list[str]:
    """The report's first lines: is there something to protect, does the protection hold against the strongest
    attacker, does the search cover the red team, intactness, then the paper's own rule; which line is the claim.
    With a retest, the first lines judge at the held-out seeds, and one more line gives the picking seeds' verdict."""
    higher, unit = e.get("higher_is_better", True), "points" if e.get("higher_is_better", True) else "MSE"
    picked = e
    e, retest_seeds = claimed(e)
    lines = []
    h = e.get("head_start")
    if h is None:
        lines.append("Something to protect: not measured (the search needs the original and the scratch start).")
    elif not h["something_to_protect"]:
        lines.append("Something to protect: NO. Under the search, fine-tuning the original (unprotected) model is no "
                     "better than training from scratch beyond the seeds' spread at any epoch, so whatever the verdict "
                     "below says, it protects nothing here.")
    else:
        lines.append(f"Something to protect: yes. Fine-tuning the original (unprotected) model beats training from "
                     f"scratch by up to {_signed(h['value'], higher)} {unit} (epoch {h['epoch']}), beyond the seeds' "
                     f"spread at {len(h['beyond_spread'])} of the {e['epochs'] + 1} epochs 0–{e['epochs']}.")
    if "advantage" not in e:
        lines.append("Against the strongest searched attacker: no verdict (the search needs the scratch and Sophon "
                     "starts).")
    else:
        b, a = e["budget"], e["advantage"]
        where = ("within the seeds' spread at every epoch" if e["holds"] else
                 f"beyond the seeds' spread at {len(e['violations'])} epochs ({_epochs(e['violations'])})")
        seeds = (f"seeds {_seeds(b.get('seeds', []))}" if retest_seeds is None else
                 f"each epoch's pick at seeds {_seeds(b.get('seeds', []))} measured at held-out seeds "
                 f"{_seeds(retest_seeds)}")
        line = (f"Against the strongest searched attacker ({b.get('trials', '?')} configurations per start, {seeds}, "
                f"{e['epochs']} epochs): protection "
                f"{'HOLDS' if e['holds'] else 'does NOT hold'}. The best attacker on Sophon gains at most "
                f"{_signed(a['value'], higher)} {unit} over the best training from scratch (epoch {a['epoch']}), "
                f"{where}.")
        shown = removed_shares(e)
        if h is not None and h["something_to_protect"] and shown:
            line += (" Share of the head start removed: "
                     + ", ".join(f"{share:.0%} at epoch {x}" for x, share in shown) + " (100%: as hard as scratch).")
        line += chance_note(e, e)
        if e["holds"]:
            line += (" It judges this release, from one protect run: another protect seed releases another model, "
                     "which may not hold (README: the ablation by protect seed).")
        lines.append(line)
        if retest_seeds is not None:
            a = picked["advantage"]
            lines.append(f"On the seeds that picked the attackers ({_seeds(b.get('seeds', []))}; every start's pick is the "
                         f"best of many noisy means there, so its value is biased up): protection "
                         f"{'holds' if picked['holds'] else 'does not hold'}, largest gain {_signed(a['value'], higher)} "
                         f"{unit} (epoch {a['epoch']})"
                         + ("." if picked["holds"] else f", beyond the spread at epochs {_epochs(picked['violations'])}.")
                         + chance_note(picked, picked))
    if e.get("redteam"):
        attacks = [(name, a) for per in e["redteam"].values() for name, a in per.items()]
        uncovered = [n for n, a in attacks if not a["vs_envelope"]["covered"]]
        beyond = [n for n, a in attacks if not a["vs_scratch"]["covered"]]
        held_out = sum(1 for _, a in attacks if a["held_out"])
        lines.append(f"Red team ({len(attacks)} fixed attacks, {held_out} held out of every tuning): "
                     + ("all covered by the search's envelope" if not uncovered else
                        f"{len(uncovered)} NOT covered by the search's envelope ({', '.join(uncovered)}): the search "
                        f"missed a stronger attacker")
                     + ("; none beats scratch beyond the seeds' spread." if not beyond else
                        f"; {len(beyond)} beat scratch beyond the seeds' spread ({', '.join(beyond)}).")
                     + _redteam_chance_note([(n, a) for n, a in attacks if a["vs_scratch"]["covered"]]))
    claim = ("the strongest-attacker line, the worst case over the search (each start's best attacker, judged within "
             "the seeds' spread)")
    if retest_seeds is not None:
        claim += (f", measured at the held-out seeds {_seeds(retest_seeds)}, which took no part in picking the attackers "
                  f"and so carry no winner's curse")
    lines += [intactness, paper_rule,
              f"Which line is the security claim: {claim}. The paper's rule compares each fixed recipe "
              "from Sophon and from scratch with no allowance for seed noise; it is stricter per epoch and weaker in "
              "attackers."]
    return lines


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def verdict_line(e: dict) -> str:
    """The envelope verdict in words."""
    if "advantage" not in e:
        return "Envelope verdict: not available (the search needs both the scratch and the Sophon start)."
    a, unit = e["advantage"], "points" if e["higher_is_better"] else "MSE"
    label = ("Envelope verdict" if not e.get("retest") else
             f"Envelope verdict on the picking seeds ({_seeds(e['budget'].get('seeds', []))}; the claim is the retest's)")
    ratio = ("no ratio: Sophon or scratch never reaches it" if e["cost_ratio"] is None
             else f"Sophon needs {e['cost_ratio']:.2f}× the attacker steps of scratch")
    target = f"{e['cost_target']:.1f}%" if e["higher_is_better"] else f"MSE {e['cost_target']:.4f}"
    if e["holds"]:
        line = (f"{label}: protection HOLDS against the strongest searched attacker over {e['epochs']} epochs: "
                f"at no epoch does fine-tuning Sophon beat training from scratch by more than the seeds' spread "
                f"(largest gain {a['value']:+.4g} {unit} at epoch {a['epoch']}). Cost to reach {target}: {ratio}.")
    else:
        line = (f"{label}: protection does NOT hold against the strongest searched attacker: fine-tuning "
                f"Sophon beats training from scratch beyond the seeds' spread at epochs {_epochs(e['violations'])} "
                f"(largest gain {a['value']:+.4g} {unit} at epoch {a['epoch']}). Cost to reach {target}: {ratio}.")
    line += chance_note(e, e)
    if e.get("holds") and e.get("something_to_protect") is False:
        line += " (The original model has no head start here either: nothing was protected; see the head start.)"
    elif e.get("holds"):
        line += (" This is one release, from one protect run: another protect seed, or the same seed on a machine "
                 "whose floating-point sums differ, releases another model, which may not hold (the ablation's "
                 "protect-seed rows measure it).")
    last = e.get("last_checkpoint")
    if last is not None:
        line += (" Every run keeps its best checkpoint so far; judged at each run's last checkpoint instead, it "
                 + ("holds too" if last["holds"] else f"does not hold at epochs {_epochs(last['violations'])}")
                 + f" (largest gain {last['advantage']['value']:+.4g} {unit} at epoch {last['advantage']['epoch']}).")
    return line


def verdict_lines(e: dict) -> list[str]:
    """The envelope verdict, then the retest's when there is one."""
    return [verdict_line(e), *filter(None, [retest_line(e)])]


def holds_metrics(e: dict) -> dict[str, int]:
    """MLflow metrics: `envelope_holds` is the claim's verdict (the retest's when there is one)."""
    claim = claimed(e)[0]
    metrics = {"envelope_holds": int(claim.get("holds", 0))}
    if "without_constant_answer" in claim:
        metrics["envelope_holds_without_constant_answer"] = int(claim["without_constant_answer"]["holds"])
    if e.get("retest"):
        metrics["envelope_holds_picking_seeds"] = int(e.get("holds", 0))
    return metrics


def retest_line(e: dict) -> str | None:
    """The verdict at the held-out seeds in words (None without a retest)."""
    r = e.get("retest")
    if not r or "advantage" not in r:
        return None
    a, unit = r["advantage"], "points" if e["higher_is_better"] else "MSE"
    line = (f"Retest at held-out seeds {_seeds(r['seeds'] or [])}: every start's pick at each epoch (above) run again at "
            f"seeds that took no part in picking it. Protection {'HOLDS' if r['holds'] else 'does NOT hold'} there"
            + ("" if r["holds"] else f": beyond the seeds' spread at epochs {_epochs(r['violations'])}")
            + f" (largest gain {a['value']:+.4g} {unit} at epoch {a['epoch']})." + chance_note(r, e)
            + " This is the claim: on the picking seeds each pick is the best of many noisy means, biased up, and "
            "more so for the start whose runs vary more.")
    if "head_start" in r:
        h = r["head_start"]
        line += (f" Head start there: up to {h['value']:+.4g} {unit} (epoch {h['epoch']}), beyond the spread at "
                 f"{len(h['beyond_spread'])} epochs.")
    return line


def _redteam_chance_note(attacks: list[tuple[str, dict]]) -> str:
    """The attacks that beat scratch only without the constant-answer attacker in its envelope, in words, or ''."""
    only = [f"{n} (epoch{'s' if len(a['beats_searched_scratch_at']) > 1 else ''} "
            f"{_epochs(a['beats_searched_scratch_at'])})" for n, a in attacks if a.get("beats_searched_scratch_at")]
    return (f" Without the constant-answer attacker in scratch's envelope {len(only)} would: {', '.join(only)}."
            if only else "")


def chance_note(verdict: dict, e: dict) -> str:
    """A sentence on the same verdict judged without the constant-answer attacker in the envelopes (`summarize`),
    where that one fails, or ''. Names the failing epochs at or below the chance level (`_verdict`'s `at_chance`)."""
    plain = verdict.get("without_constant_answer")
    if not plain or plain["holds"] or "holds" not in verdict or plain["violations"] == verdict["violations"]:
        return ""
    at_chance, fails = plain.get("at_chance", []), plain["violations"]
    which = ("every one of them" if len(at_chance) == len(fails) else
             f"of them epoch{'s' if len(at_chance) > 1 else ''} {_epochs(at_chance)}" if at_chance else "none of them")
    return (f" Without the constant-answer attacker (one class for every image: {e['chance_level']:.1f}%, the restricted "
            f"test set's majority-class share) in the envelopes it {'would fail' if verdict['holds'] else 'fails'} at "
            f"epoch{'s' if len(fails) > 1 else ''} {_epochs(fails)} (largest gain {plain['advantage']['value']:+.4g} "
            f"points at epoch {plain['advantage']['epoch']}), {which} with Sophon's best attacker at or below that "
            f"share: a gain that comes from which class a collapsed model answers, not from what it reads in the images.")


def _epochs(epochs: list[int]) -> str:
    return ", ".join(str(x) for x in epochs[:12]) + (" …" if len(epochs) > 12 else "")


def _fmt(value: float, higher: bool) -> str:
    return f"{value:.1f}" if higher else f"{value:.4f}"


def _signed(value: float, higher: bool) -> str:
    """A difference: points to one decimal, MSE to four (so a float's last bits never show)."""
    return f"{value:+.1f}" if higher else f"{value:+.4f}"


def section(e: dict, figure: Path, epochs: list[int]) -> Section:
    """The report section of the attack search."""
    higher = e["higher_is_better"]
    b = e["budget"]
    halving = b.get("halving", {})
    blocks = [*verdict_lines(e), head_start_line(e),
              f"Spread rule: {e.get('spread_rule', 'n/a')}",
              f"Every start searched the same space with the same budget: {b['trials']} configurations at seed "
              f"{b['coarse_seed']} (the strata strategy × optimiser taking turns, the rest sampled by Optuna's TPE; "
              f"from scratch the strategy axis does not apply and shrink-and-perturb is an init scale), fine-tuned by "
              f"successive halving ({halving.get('pruner', 'successive_halving')}, rungs from "
              f"{halving.get('min_epochs', 1)} epoch, reduction {halving.get('reduction', 3)}) up to "
              f"{b['coarse_epochs']} epochs. Confirmed at seeds {b['seeds']}: the best {b['confirm_top']} by area for "
              f"{e['epochs']} epochs, and the best {b.get('candidate_top', 1)} at each of epochs "
              f"{b.get('candidate_epochs', [])} and the coarse end for the coarse horizon. The envelope is, at each "
              f"epoch e, the best confirmed configuration with a budget of e epochs: mean ± std over the seeds of the "
              f"best checkpoint each run holds by then (a shorter horizon keeps its final best beyond it). Score = "
              f"area under the curve (mean over epochs 1…E{'' if higher else ', negated MSE'})."]
    if "chance_level" in e:
        blocks.append(f"Constant answer: every start's envelope includes the attacker that answers one class for every "
                      f"image, whichever scores best on the restricted test set ({e['chance_level']:.1f}%, its "
                      f"majority-class share, at every epoch, no seed spread). It is a pick wherever the searched "
                      f"configurations score less, so a model that collapsed onto a frequent class gains nothing over "
                      f"scratch's random initialisations for that alone.")
    shown = [x for x in epochs if x <= e["epochs"]]
    rows = []
    for start, s in e["starts"].items():
        cells = [f"{_fmt(s['mean'][x], higher)} ± {_fmt(s['std'][x], higher)}" for x in shown]
        rows.append([ROW_NAMES.get(start, start), str(s.get("tried", "?")), s["best"], _fmt(s["best_score"], True), *cells])
    blocks.append(Table(["start", "tried", "best configuration (long horizon)", "score", *[f"epoch {x}" for x in shown]], rows,
                        f"The envelope per start ({e['metric']}, mean ± std over seeds)."))
    if "advantage" in e:
        blocks.append(Table(["", *[f"epoch {x}" for x in shown]], _gain_rows(e, shown, higher, spread=True),
                            "Positive gain: fine-tuning the Sophon model beats training from scratch. Share removed: "
                            "(original − Sophon) / (original − scratch), '–' where the head start is within the spread."))
    blocks.extend(_retest_blocks(e, shown))
    blocks.extend(_redteam_blocks(*claimed(e)))
    blocks.append(Image(figure, "The attacker's envelope per start"))
    for axis, title in SLICES.items():
        table = e["slices"][axis]
        values = sorted({v for per in table.values() for v in per}, key=lambda v: (isinstance(v, str), v))
        rows = [[ROW_NAMES.get(start, start), *[_fmt(per[v]["score"], True) if v in per else "–" for v in values]]
                for start, per in table.items()]
        blocks.append(Table(["start", *[str(v) for v in values]], rows,
                            f"{title}: the best coarse score at each value, over all other axes."))
    return Section("The strongest attacker (attack search)", blocks)


def _gain_rows(v: dict, shown: list[int], higher: bool, *, spread: bool) -> list[list[str]]:
    """Table rows of one verdict (`_judge`'s keys) at the `shown` epochs: the attacker's gain, the head start (and its
    spread), the share of it removed."""
    rows = [["Sophon − scratch (attacker's gain)", *[_signed(v["advantage"]["per_epoch"][x], higher) for x in shown]]]
    if "head_start" in v:
        rows.append(["original − scratch (head start)", *[_signed(v["head_start"]["per_epoch"][x], higher) for x in shown]])
        if spread:
            rows.append(["seeds' spread of the head start",
                         *[_signed(v["head_start"]["spread"][x], higher)[1:] for x in shown]])
    if v.get("removed"):
        rows.append(["share of the head start removed",
                     *["–" if v["removed"][x] is None else f"{v['removed'][x]:.0%}" for x in shown]])
    return rows


def _retest_blocks(e: dict, shown: list[int]) -> list:
    """The retest's envelope per start and its gains, at the table's epochs."""
    r = e.get("retest")
    if not r:
        return []
    higher = e["higher_is_better"]
    rows = [[ROW_NAMES.get(start, start), *[f"{_fmt(s['mean'][x], higher)} ± {_fmt(s['std'][x], higher)}" for x in shown]]
            for start, s in r["starts"].items()]
    if "advantage" in r:
        rows += _gain_rows(r, shown, higher, spread=False)
    return [Table(["", *[f"epoch {x}" for x in shown]], rows,
                  f"Retest at held-out seeds {_seeds(r['seeds'] or [])}: each epoch's pick of the envelope above, mean "
                  f"± std over these seeds ({e['metric']}).")]


def _redteam_blocks(e: dict, retest_seeds: list[int] | None = None) -> list:
    """The red-team suite: per attack, whether the search's envelope covers it and whether it beats scratch (the
    retest's envelopes at `retest_seeds` when there is one)."""
    if not e.get("redteam"):
        return []
    higher, unit = e["higher_is_better"], "points" if e["higher_is_better"] else "MSE"
    rows, uncovered = [], []
    for start, attacks in e["redteam"].items():
        for name, a in attacks.items():
            env_check, scratch_check = a["vs_envelope"], a["vs_scratch"]
            last = len(env_check["mean"]) - 1
            if not env_check["covered"]:
                uncovered.append(f"{name} ({ROW_NAMES.get(start, start)})")
            held_out = "no" if not a["held_out"] else "yes, and chose the release" if a.get("selected_release") else "yes"
            rows.append([ROW_NAMES.get(start, start), name, held_out,
                         f"{_fmt(env_check['mean'][1], higher)} ± {_fmt(env_check['std'][1], higher)}",
                         f"{_fmt(env_check['mean'][last], higher)} ± {_fmt(env_check['std'][last], higher)}",
                         "yes" if env_check["covered"] else f"NO: epochs {_epochs(env_check['violations'])}",
                         f"{_signed(env_check['max_excess'], higher)} (epoch {env_check['epoch']})",
                         "no" if scratch_check["covered"] else f"YES: epochs {_epochs(scratch_check['violations'])}",
                         f"{_signed(scratch_check['max_excess'], higher)} (epoch {scratch_check['epoch']})"])
    words = ("Every red-team attack is covered by the search's envelope." if not uncovered else
             f"The search's envelope does NOT cover {len(uncovered)} red-team attack(s): {', '.join(uncovered)}: "
             f"the search missed a stronger attacker, so the envelope verdict is not a worst case.")
    return [f"Red-team suite: {words}",
            Table(["start", "attack", "held out", "epoch 1", "last epoch", "covered by the envelope",
                   f"largest excess over the envelope ({unit})", "beats scratch beyond the spread",
                   f"largest gain over scratch ({unit})"], rows,
                  "Each attack at every red-team seed (mean ± std of the best checkpoint so far). Covered: at every "
                  "epoch within the seeds' spread sqrt(std_env² + std_attack²) of the envelope"
                  + ("" if retest_seeds is None else f" (the retest's, at held-out seeds {_seeds(retest_seeds)})")
                  + ". Held out: its settings "
                  "were kept out of every tuning ('and chose the release': with sophon.select: redteam it also scored "
                  "short probes (sophon.probe_epochs epochs) on the defender's data that picked the released checkpoint).")]


def majority_share(labels) -> float:
    """The most frequent label's share, in %: the accuracy of one answer for every image."""
    return 100.0 * labels.bincount().max().item() / max(1, len(labels))


def restricted_chance(experiment: str) -> float:
    """The chance level of an experiment's restricted test set (`majority_share`), read from its split."""
    from sophon import layout
    from sophon.data.splits import load_part

    return majority_share(load_part(layout.split_part(experiment, "restricted_test"),
                                    layout.split_manifest(experiment)).labels)


def build(search: dict, experiment: str, out_dir: Path, epochs: list[int],
          redteam: dict | None = None) -> tuple[dict, Section, Path]:
    """Read every start's search result, summarise it, draw the envelope figure; return (envelope, section, figure).
    The section's table shows the report's epochs plus every 10th up to the long horizon."""
    from sophon import layout
    from sophon.report import figures
    from sophon.report.aggregate import read_input

    docs = {start: read_input(layout.search_result(experiment, start)) for start in ["scratch", *search["starts"]]}
    suite = ({start: read_input(layout.redteam_result(experiment, start)) for start in redteam["starts"]}
             if redteam and redteam.get("attacks") else None)
    higher = next(iter(docs.values()))["higher_is_better"]
    summary = summarize(docs, search, suite, chance=restricted_chance(experiment) if higher else None)
    figure = Path(out_dir) / "envelope.png"
    figures.envelopes(summary, figure, ylabel=summary["metric"],
                      title=f"Attacker's envelope, {experiment}")
    shown = sorted({*epochs, *range(10, search["epochs"] + 1, 10)})
    return summary, section(summary, figure, shown), figure
