"""Turn loaded curves, histories and cards into the report's summary dict (pure: no file I/O).

Every "mean ± std" is over the attack seeds; std is the population standard deviation (numpy, ddof=0).
"""

from __future__ import annotations

import numpy as np

from sophon.attacks import best_lr, sweep_score
from sophon.errors import SophonError
from sophon.layout import STARTS

MODELS = ("original", "ntl", "sophon")

STD_NOTE = "population standard deviation over seeds (numpy, ddof=0)"
NTL_RECOVERY_MARGIN = 5.0  # NTL counts as recovered when its final accuracy is ≥ scratch's final − this many points
SETTING_KEYS = ("strategy", "optimizer", "lr", "batch_size", "weight_decay", "epochs", "method")


class ReportInputError(SophonError):
    """An input of the report is missing or inconsistent."""


def read_input(path):
    """One JSON input of a report; a missing or unreadable file is a one-line ReportInputError naming it."""
    import json

    from sophon.io import read_json

    if not path.exists():
        raise ReportInputError(f"report input missing: {path} (run the stage that writes it first)")
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise ReportInputError(f"report input {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None



def mean_std(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}


def curve_stats(curves: list[list[float]], where: str = "curves") -> dict:
    """Per-epoch mean ± std over seeds: {"0": {"mean", "std"}, "1": ...} (string epoch keys)."""
    if len({len(c) for c in curves}) != 1:
        raise ReportInputError(f"{where}: the seeds' curves differ in length ({sorted({len(c) for c in curves})})")
    stacked = np.asarray(curves, dtype=float)
    return {str(epoch): mean_std(stacked[:, epoch]) for epoch in range(stacked.shape[1])}


def means(stats: dict) -> list[float]:
    """The per-epoch means of `curve_stats` output, in epoch order."""
    return [stats[str(e)]["mean"] for e in range(len(stats))]


def aggregate_attack(name: str, docs_by_start: dict[str, list[dict]]) -> dict:
    """One attack: its (resolved) settings and the per-start, per-epoch mean ± std; absent starts are skipped."""
    present = {start: docs for start, docs in docs_by_start.items() if docs}
    if not present:
        raise ReportInputError(f"attack {name}: no curves at all")
    settings = {tuple((k, d["settings"].get(k)) for k in SETTING_KEYS) for docs in present.values() for d in docs}
    if len(settings) > 1:
        raise ReportInputError(f"attack {name}: its curve files disagree on the settings (e.g. a changed sweep lr); "
                               f"rerun the attack grid")
    entry = dict(next(iter(settings)))
    entry["restricted_accuracy"] = {start: curve_stats([d["restricted_accuracy"] for d in present[start]],
                                                       f"attack {name}, start {start}")
                                    for start in STARTS if start in present}
    entry["missing_starts"] = [s for s in STARTS if s not in present]
    return entry


def attack_verdict(entry: dict, chance: float) -> dict | None:
    """Sophon vs training from scratch (B1) at every epoch, and what pretraining gives the adversary (B2 − B1)."""
    acc = entry["restricted_accuracy"]
    if "scratch" not in acc or "sophon" not in acc:
        return None
    scratch, sophon = acc["scratch"], acc["sophon"]
    epochs = [e for e in scratch if e in sophon]
    excess = {e: sophon[e]["mean"] - scratch[e]["mean"] for e in epochs}
    above = [int(e) for e in epochs if excess[e] > 0]
    last = epochs[-1]
    verdict = {
        "sophon_at_or_below_scratch_every_epoch": not above,
        "epochs_above_scratch": above,
        "max_excess_over_scratch": max(excess.values()),
        "within_noise_every_epoch": all(sophon[e]["mean"] <= scratch[e]["mean"] + scratch[e]["std"] + sophon[e]["std"]
                                        for e in epochs),
        "sophon_final": sophon[last]["mean"],
        "scratch_final": scratch[last]["mean"],
        "original_final": None,
        "chance": chance,
        "pretraining_advantage": None,
        "pretraining_advantage_epoch": None,
    }
    if "original" in acc:
        original = acc["original"]
        gains = {e: original[e]["mean"] - scratch[e]["mean"] for e in epochs if e in original}
        best = max(gains, key=gains.get)
        verdict.update(original_final=original[last]["mean"], pretraining_advantage=gains[best],
                       pretraining_advantage_epoch=int(best))
    return verdict


def ntl_verdict(attacks: dict) -> dict | None:
    """NTL (B3) before and after fine-tuning, under the first attack that ran from both NTL and scratch."""
    for name, entry in attacks.items():
        acc = entry["restricted_accuracy"]
        if "ntl" in acc and "scratch" in acc:
            ntl, scratch_final = means(acc["ntl"]), means(acc["scratch"])[-1]
            return {"attack": name, "before_finetune": ntl[0], "after_finetune": ntl[-1],
                    "recovered": ntl[-1] >= scratch_final - NTL_RECOVERY_MARGIN,
                    "recovered_rule": f"after_finetune >= scratch_final - {NTL_RECOVERY_MARGIN}"}
    return None


def sweep_summary(sweep_docs: dict) -> dict:
    """{"lrs": {lr: score}, "best_lr", "curves": {lr: curve}}, score = mean restricted accuracy over epochs 1..E."""
    curves = {lr: doc["restricted_accuracy"] for lr, doc in sweep_docs.items()}
    return {"lrs": {str(lr): sweep_score(c) for lr, c in curves.items()},
            "best_lr": best_lr(curves) if curves else None,
            "curves": {str(lr): list(c) for lr, c in curves.items()},
            "score": "mean restricted accuracy over epochs 1..E (sophon.attacks.sweep_score)"}


def training_summary(sophon_history: dict | None, ntl_history: dict | None) -> dict:
    """The protect (Sophon) and NTL runs in brief: settings, loop counts, rollbacks, accuracies."""
    out = {}
    if sophon_history is not None:
        out["sophon"] = {"settings": sophon_history.get("settings", {}), "loops": len(sophon_history.get("loop", [])),
                         "rollbacks": sophon_history.get("rollbacks", 0), "nonfinite": sophon_history.get("nonfinite", 0),
                         "checks": len(sophon_history.get("checks", [])),
                         "original_accuracy": sophon_history.get("original_test_accuracy"),
                         "restricted_accuracy": sophon_history.get("restricted_test_accuracy"),
                         "basin": sophon_history.get("basin"), "readout": sophon_history.get("readout")}
    if ntl_history is not None:
        out["ntl"] = {"settings": ntl_history.get("settings", {}), "steps": len(ntl_history.get("loss", [])),
                      "original_accuracy": ntl_history.get("original_test_accuracy"),
                      "restricted_accuracy": ntl_history.get("restricted_test_accuracy")}
    return out


def build_summary(config: dict, attack_docs: dict[str, dict[str, list[dict]]], sweep_docs: dict,
                  original_accuracy: dict[str, float], sophon_history: dict | None = None,
                  ntl_history: dict | None = None) -> dict:
    """The whole summary.json: attack_docs = {attack: {start: [curve doc per seed]}}, sweep_docs = {lr: curve doc},
    original_accuracy = {model: original-domain test accuracy from its card} (models may be absent)."""
    chance = 100.0 / config["model"]["num_classes"]
    attacks = {name: aggregate_attack(name, docs) for name, docs in attack_docs.items()}
    verdicts = {name: attack_verdict(entry, chance) for name, entry in attacks.items()}
    tolerance = config["report"]["intactness_tolerance"]
    intactness = {"drop": None, "tolerance": tolerance, "holds": False}
    if "original" in original_accuracy and "sophon" in original_accuracy:
        drop = original_accuracy["original"] - original_accuracy["sophon"]
        intactness.update(drop=drop, holds=drop <= tolerance)
    attack_verdicts = {name: v for name, v in verdicts.items() if v is not None}
    return {
        "experiment": config["name"],
        "chance_accuracy": chance,
        "seeds": list(config["seeds"]),
        "std": STD_NOTE,
        "original_domain_accuracy": {m: {"mean": float(original_accuracy[m]), "std": 0.0}
                                     for m in MODELS if m in original_accuracy},
        "attacks": attacks,
        "sweep": sweep_summary(sweep_docs),
        "training": training_summary(sophon_history, ntl_history),
        "verdicts": {
            "intactness": intactness,
            "attacks": attack_verdicts,
            "attacks_without_verdict": [name for name, v in verdicts.items() if v is None],
            "ntl": ntl_verdict(attacks),
            # Every attack must have a verdict: an attack that did not run from both scratch and Sophon proves nothing.
            "protection_holds": bool(intactness["holds"] and len(attack_verdicts) == len(verdicts) and all(
                v["sophon_at_or_below_scratch_every_epoch"] for v in attack_verdicts.values())),
        },
    }
