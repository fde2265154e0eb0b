"""The generation experiment's report: summary (pure), figures (Fig. 4, 5/6, 14 analogues) and the document,
rendered by sophon.report.render like the classification report. MSE is lower-is-better throughout."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sophon.tasks import TASKS  # noqa: E402

GEN_STARTS = TASKS["diffusion"].starts
from sophon.report.figures import _save, draw_checks  # noqa: E402
from sophon.report.aggregate import STD_NOTE, ReportInputError, curve_stats, mean_std  # noqa: E402
from sophon.report.render import Bullets, Document, Image, Section, Table, basin_sentence  # noqa: E402

LABELS = {"scratch": "train from scratch (B1)", "original": "fine-tune original (B2)", "sophon": "fine-tune Sophon"}
ROW_NAMES = {"scratch": "Train from scratch", "original": "Original model", "sophon": "Sophon model"}
COLORS = {"scratch": "tab:gray", "original": "tab:blue", "sophon": "tab:red"}
LOSS_NAMES = {"dos": "DoS ‖ε_θ‖²", "neg_mse": "negated MSE −‖ε_θ − ε‖²"}


# ---- summary ------------------------------------------------------------------------------------------------

def summarize(*, experiment: str, seeds: list[int], attacks: dict[str, dict], curves: dict, cards: dict,
              histories: dict, stability: dict, report: dict) -> dict:
    """`curves[attack][start]` = the attack stage's JSON documents (one per seed); `cards[name]` = model cards;
    `histories[name]` = training histories; `stability[loss]` = the stability documents (one per seed)."""
    summary = {"experiment": experiment, "seeds": seeds, "std": STD_NOTE,
               "metric": "noise-prediction MSE with fixed noise and timesteps (lower is better)",
               "original_domain_mse": {}, "attacks": {}, "stability": {}, "training": {}, "timings": {}}
    for name in ("original", "sophon"):
        if name in cards:
            summary["original_domain_mse"][name] = mean_std([cards[name]["original_test_mse"]])
    for attack, settings in attacks.items():
        entry = {"strategy": "direct+all", **settings, "restricted_mse": {}, "missing_starts": []}
        for start in GEN_STARTS:
            docs = curves.get(attack, {}).get(start, [])
            if not docs:
                entry["missing_starts"].append(start)
                continue
            entry["restricted_mse"][start] = curve_stats([d["restricted_mse"] for d in docs],
                                                         f"generation attack {attack}, start {start}")
        summary["attacks"][attack] = entry
    for loss, docs in stability.items():
        outcomes = [d["outcome"] for d in docs]
        summary["stability"][loss] = {"runs": len(docs), "nan": outcomes.count("nan"),
                                      "diverged": outcomes.count("diverged"), "stable": outcomes.count("stable"),
                                      "by_seed": {str(d["seed"]): d["outcome"] for d in docs},
                                      "first_loss": _finite_stat([_finite(d["suppression_loss"], 0) for d in docs]),
                                      "last_loss": _finite_stat([_finite(d["suppression_loss"], -1) for d in docs]),
                                      "restricted_test_mse_end": _finite_stat([d.get("restricted_test_mse_end")
                                                                               for d in docs]),
                                      "original_val_mse_end": _finite_stat([d.get("original_val_mse_end") for d in docs]),
                                      "divergence_threshold": docs[0]["divergence_threshold"] if docs else None}
    for name, history in histories.items():
        summary["training"][name] = {k: history[k] for k in ("original_test_mse", "original_val_mse",
                                                             "restricted_test_mse", "seconds", "rollbacks",
                                                             "nonfinite", "settings", "basin") if k in history}
        if "loop" in history:
            summary["training"][name]["loops"] = len(history["loop"])
    summary["timings"] = _timings(histories, curves, stability)
    summary["verdicts"] = verdicts(summary, report)
    return summary


def _finite(values, index):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return finite[index] if finite else None


def _finite_stat(values) -> dict | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return mean_std(values) if values else None


def _timings(histories, curves, stability) -> dict:
    timings = {f"gen_{'pretrain' if name == 'original' else 'protect'}": round(h.get("seconds", float("nan")), 1)
               for name, h in histories.items()}
    attack_seconds = [d["seconds"] for by_start in curves.values() for docs in by_start.values() for d in docs]
    stability_seconds = [d["seconds"] for docs in stability.values() for d in docs]
    for key, values in (("gen_attack", attack_seconds), ("gen_stability", stability_seconds)):
        if values:
            timings[key] = {"runs": len(values), "total": round(sum(values), 1), "mean": round(sum(values) / len(values), 1)}
    return timings


def verdicts(summary: dict, report: dict) -> dict:
    """Plain booleans: intactness within tolerance, Sophon at or above scratch at every epoch (each attack and
    overall), and whether fine-tuning the original model beats training from scratch early (else nothing to protect)."""
    tolerance = report["intactness_tolerance"]
    mse = summary["original_domain_mse"]
    intact = {"tolerance": tolerance, "original": None, "sophon": None, "relative_rise": None, "holds": False}
    if "original" in mse and "sophon" in mse:
        original, sophon = mse["original"]["mean"], mse["sophon"]["mean"]
        rise = (sophon - original) / original
        intact.update(original=original, sophon=sophon, relative_rise=rise, holds=bool(rise <= tolerance))
    early = [e for e in report["epochs"] if 1 <= e <= 5] or [1]
    per_attack = {}
    for name, entry in summary["attacks"].items():
        stats = entry["restricted_mse"]
        if "scratch" not in stats or "sophon" not in stats:
            continue
        last = len(stats["scratch"]) - 1
        epochs = range(last + 1)
        scratch = [stats["scratch"][str(e)]["mean"] for e in epochs]
        sophon = [stats["sophon"][str(e)]["mean"] for e in epochs]
        below = [e for e in epochs if sophon[e] < scratch[e]]
        reported = [e for e in report["epochs"] if e <= last]
        verdict = {"sophon_at_or_above_scratch_every_epoch": not below,
                   "sophon_at_or_above_scratch_every_reported_epoch": not [e for e in below if e in reported],
                   "epochs_sophon_below_scratch": below,
                   "max_shortfall_below_scratch": max((scratch[e] - sophon[e] for e in below), default=0.0),
                   "within_noise_where_below": all(
                       scratch[e] - sophon[e] <= stats["scratch"][str(e)]["std"] + stats["sophon"][str(e)]["std"]
                       for e in below),
                   "sophon_final": sophon[-1], "scratch_final": scratch[-1]}
        if "original" in stats:
            original = [stats["original"][str(e)]["mean"] for e in epochs]
            early_here = [e for e in early if e <= last]
            verdict["original_beats_scratch_early"] = all(original[e] < scratch[e] for e in early_here)
            verdict["early_epochs"] = early_here
            verdict["original_final"] = original[-1]
            verdict["sophon_above_original_every_epoch"] = all(sophon[e] >= original[e] for e in epochs)
        per_attack[name] = verdict
    holds_all = bool(per_attack) and all(v["sophon_at_or_above_scratch_every_epoch"] for v in per_attack.values())
    advantage = bool(per_attack) and all(v.get("original_beats_scratch_early", False) for v in per_attack.values())
    return {"intactness_within_tolerance": intact["holds"], "intactness": intact,
            "sophon_at_or_above_scratch_every_epoch": holds_all, "pretraining_advantage": advantage,
            "protection_holds": bool(intact["holds"] and holds_all), "attacks": per_attack}


# ---- figures ------------------------------------------------------------------------------------------------

def mse_curves(summary: dict, path) -> None:
    """Restricted test MSE vs fine-tuning epoch, mean ± std over seeds, one panel per attack (paper Fig. 4)."""
    attacks = summary["attacks"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 3.7), squeeze=False)
    for ax, (name, entry) in zip(axes[0], attacks.items()):
        for start in GEN_STARTS:
            stats = entry["restricted_mse"].get(start)
            if stats is None:
                continue
            epochs = np.arange(len(stats))
            mean = np.array([stats[str(e)]["mean"] for e in epochs])
            std = np.array([stats[str(e)]["std"] for e in epochs])
            ax.plot(epochs, mean, "o-", ms=2.5, color=COLORS[start], label=LABELS[start], lw=1.6)
            ax.fill_between(epochs, np.maximum(mean - std, 1e-4), mean + std, color=COLORS[start], alpha=0.18, lw=0)
        ax.set_title(f"{name}: {entry['optimizer']}, lr {entry['lr']}, batch {entry['batch_size']}", fontsize=9)
        ax.set(xlabel="fine-tuning epoch", ylabel="restricted test MSE (log scale)", yscale="log")
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    _save(fig, path)


def image_grid(rows: list[tuple[str, np.ndarray]], path, title: str) -> None:
    """Rows of uint8 N×C×H×W images, each row labelled (paper Fig. 5/6)."""
    count = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), count, figsize=(1.05 * count + 1.6, 1.05 * len(rows) + 0.5), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                image = np.asarray(images[c])
                if image.shape[0] == 1:
                    ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def stability(summary: dict, docs: dict[str, list[dict]], path) -> None:
    """Suppression loss per loop for each loss and seed; NaN loops marked (paper Fig. 14)."""
    losses = list(docs)
    fig, axes = plt.subplots(1, len(losses), figsize=(5.2 * len(losses), 3.6), squeeze=False)
    for ax, loss in zip(axes[0], losses):
        counts = summary["stability"][loss]
        for doc in docs[loss]:
            loops = np.asarray(doc["loops"], dtype=float)
            values = np.asarray([np.nan if v is None else v for v in doc["suppression_loss"]], dtype=float)
            line, = ax.plot(loops, values, lw=1.2, label=f"seed {doc['seed']}: {doc['outcome']}")
            bad = ~np.isfinite(values)
            if bad.any():
                ax.plot(loops[bad], np.zeros(int(bad.sum())), "x", color=line.get_color(), ms=6)
        finite = [abs(v) for d in docs[loss] for v in d["suppression_loss"] if v is not None]
        if finite and max(finite) > 10:
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"{LOSS_NAMES[loss]}: {counts['nan']} NaN, {counts['diverged']} diverged of {counts['runs']} seeds",
                     fontsize=9)
        ax.set(xlabel="Sophon loop", ylabel="suppression loss")
        ax.axhline(0, color="black", lw=0.6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def protect_history(history: dict, path) -> None:
    """The protect run: suppression (DoS) loss per loop above the original-domain validation MSE at the checks."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    loops = np.asarray(history["loop"], dtype=float)
    values = np.asarray(history["suppression_loss"], dtype=float)
    top.plot(loops, values, color="tab:red", lw=1)
    top.set(ylabel="suppression loss", title="Sophon (diffusion): suppression after simulated fine-tuning")
    draw_checks(top, bottom, history["checks"], "original-domain val MSE", "MSE")
    _save(fig, path)


def curve_csv(entry: dict) -> str:
    """Mean MSE per epoch and start, for `dvc plots`."""
    stats = entry["restricted_mse"]
    starts = [s for s in GEN_STARTS if s in stats]
    last = max(len(v) for v in stats.values())
    lines = ["epoch," + ",".join(starts)]
    lines += [f"{e}," + ",".join(f"{stats[s][str(e)]['mean']:.6f}" for s in starts) for e in range(last)]
    return "\n".join(lines) + "\n"


# ---- the document ---------------------------------------------------------------------------------------------

def _pm(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def _fmt(value, digits=4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _epoch_list(epochs: list[int]) -> str:
    if epochs and epochs == list(range(epochs[0], epochs[-1] + 1)) and len(epochs) > 2:
        return f"every epoch {epochs[0]}–{epochs[-1]}"
    return "epochs " + ", ".join(map(str, epochs))


def intactness_line(summary: dict) -> str:
    i = summary["verdicts"]["intactness"]
    if i["relative_rise"] is None:
        return "Intactness: not measured (a model card is missing)."
    return (f"Intactness {'holds' if i['holds'] else 'does NOT hold'}: original-domain test MSE {i['original']:.4f} "
            f"(original) vs {i['sophon']:.4f} (Sophon), a {100 * i['relative_rise']:+.1f}% change (tolerance "
            f"+{100 * i['tolerance']:.0f}%).")


def paper_rule_line(summary: dict) -> str:
    """The paper's fixed attacks under its strict rule, in one line (the report's first section)."""
    attacks = summary["verdicts"]["attacks"]
    held = [n for n, a in attacks.items() if a["sophon_at_or_above_scratch_every_epoch"]]
    failed = [f"{n} {a['max_shortfall_below_scratch']:.4f} MSE below scratch, "
              f"{'within' if a['within_noise_where_below'] else 'beyond'} seed noise"
              for n, a in attacks.items() if n not in held]
    return (f"The paper's fixed attacks, strict rule (Sophon's restricted MSE at or above scratch's under the same "
            f"recipe at every epoch, no allowance for seed noise): protection holds under {len(held)} of {len(attacks)}"
            + (f" (largest shortfall: {'; '.join(failed)})." if failed else "."))


def verdict_lines(summary: dict) -> list[str]:
    v = summary["verdicts"]
    lines = [f"The paper's rule over every fixed attack: protection {'holds' if v['protection_holds'] else 'does NOT hold'} "
             "(needs intactness and Sophon's restricted MSE at or above training from scratch at every epoch under every "
             "attack).", intactness_line(summary)]
    for name, a in v["attacks"].items():
        final = f"final MSE Sophon {a['sophon_final']:.4f} vs scratch {a['scratch_final']:.4f}"
        if "original_final" in a:
            final += f" and original {a['original_final']:.4f}"
        if a["sophon_at_or_above_scratch_every_epoch"]:
            lines.append(f"Non-fine-tunability holds under {name}: fine-tuning Sophon stays at or above training from "
                         f"scratch at every epoch ({final}).")
        else:
            noise = "within seed noise (±1 std each)" if a["within_noise_where_below"] else "beyond seed noise"
            lines.append(f"Non-fine-tunability does NOT hold under {name}: fine-tuning Sophon reaches a LOWER MSE than "
                         f"training from scratch at {_epoch_list(a['epochs_sophon_below_scratch'])} "
                         f"(by up to {a['max_shortfall_below_scratch']:.4f}, {noise}; {final}).")
        if "original_beats_scratch_early" in a:
            early = ", ".join(map(str, a["early_epochs"]))
            lines.append(f"Pretraining advantage under {name}: fine-tuning the original model "
                         f"{'beats' if a['original_beats_scratch_early'] else 'does NOT beat'} training from scratch "
                         f"at the early epochs {early}" + ("" if a["original_beats_scratch_early"] else
                                                           " — so there is little for Sophon to take away") + ".")
    for loss, s in summary["stability"].items():
        trend = ""
        if s.get("first_loss") and s.get("last_loss"):
            trend = f"; mean loss {s['first_loss']['mean']:.3f} at the first loop → {s['last_loss']['mean']:.3f} at the last"
        lines.append(f"Stability, {LOSS_NAMES[loss]}: {s['nan']} of {s['runs']} seeds went NaN, {s['diverged']} diverged "
                     f"(|loss| > {s['divergence_threshold']}), {s['stable']} stayed finite and below it{trend}.")
    return lines


def attack_table(summary: dict, name: str, epochs) -> Table:
    """Table II: a row per start, original-domain MSE, then restricted MSE-k, mean ± std over seeds."""
    entry = summary["attacks"][name]
    stats = entry["restricted_mse"]
    last = max(len(s) for s in stats.values()) - 1 if stats else 0
    shown = [e for e in epochs if e <= last]
    original = summary["original_domain_mse"]
    rows = [[ROW_NAMES[start], _fmt(original[start]["mean"]) if start in original else "–",
             *(_pm(stats[start][str(e)]) for e in shown)] for start in GEN_STARTS if start in stats]
    caption = (f"{name}: direct+all, {entry['optimizer']}, lr {entry['lr']}, batch {entry['batch_size']}, weight decay "
               f"{entry['weight_decay']}, {entry['epochs']} epochs; restricted test MSE after k epochs (MSE-k), "
               f"mean ± std over seeds {', '.join(map(str, summary['seeds']))}")
    return Table(["Model", "Original MSE", *(f"MSE-{e}" for e in shown)], rows, caption)


def build_document(summary: dict, epochs, images: dict[str, Path], notes: list[str]) -> Document:
    seeds = ", ".join(map(str, summary["seeds"]))
    intro = (f"Experiment {summary['experiment']}: a diffusers UNet noise predictor (DDPM, T = 1000, linear betas "
             f"1e-4 → 0.02). Metric: {summary['metric']}. Attack seeds {seeds}; std is the {summary['std']}.")
    sections = [Section("Verdicts", [intro, Bullets(verdict_lines(summary))])]
    if notes:
        sections.append(Section("Setup", [Bullets(notes)]))
    sections.append(Section("Intactness (original-domain test MSE)", [Table(
        ["Model", "Original-domain MSE"],
        [[ROW_NAMES[m], _fmt(s["mean"])] for m, s in summary["original_domain_mse"].items()],
        "single trained models (no seed spread)")]))
    attacks = Section("Restricted-domain MSE under fine-tuning (paper Table II, Fig. 4)",
                      [attack_table(summary, name, epochs) for name in summary["attacks"]])
    attacks.blocks.append(Image(images["mse_curves"], "restricted test MSE vs fine-tuning epoch"))
    sections.append(attacks)
    sections.append(Section("Denoising (paper Fig. 5 and 6)", [
        "Test images noised at one fixed timestep, then denoised in one step (x̂0 from the predicted noise) by each "
        "model. Fine-tuned models: the first attack, first seed.",
        Image(images["denoise_restricted"], "restricted-domain denoising"),
        Image(images["denoise_original"], "original-domain denoising")]))
    stab = Section("Stability of the suppression loss (paper §5.8, Fig. 14)", [
        "Sophon runs from the original model with the protect settings, no rollback, one run per seed and loss."])
    stab.blocks.append(Table(
        ["Suppression loss", "runs", "NaN", "diverged", "stable", "loss at first loop", "loss at last loop",
         "restricted MSE after", "original val MSE after"],
        [[LOSS_NAMES[k], s["runs"], s["nan"], s["diverged"], s["stable"], *(
            "–" if s.get(key) is None else _pm(s[key]) for key in ("first_loss", "last_loss", "restricted_test_mse_end",
                                                                   "original_val_mse_end"))]
         for k, s in summary["stability"].items()],
        "mean ± std over the stability seeds of finite values; restricted MSE before any fine-tuning"))
    stab.blocks.append(Image(images["stability"], "suppression loss per loop, per seed"))
    sections.append(stab)
    if "sophon" in summary["training"]:
        t = summary["training"]["sophon"]
        sections.append(Section("Sophon protection run", [
            f"Loops: {t.get('loops')}; rollbacks: {t.get('rollbacks')}; loops with a non-finite suppression loss: "
            f"{t.get('nonfinite')}; restricted test MSE before fine-tuning {_fmt(t.get('restricted_test_mse'))}.",
            basin_sentence(t.get("basin")),
            Table(["Setting", "Value"], [[k, str(v)] for k, v in t.get("settings", {}).items()]),
            Image(images["protect_history"], "Sophon protection history")]))
    timing_rows = []
    for stage, value in summary["timings"].items():
        if isinstance(value, dict):
            timing_rows.append([stage, f"{value['total']:.0f} s over {value['runs']} runs (mean {value['mean']:.1f} s)"])
        else:
            timing_rows.append([stage, f"{value:.0f} s"])
    sections.append(Section("Time per stage (compute inside the stage, excluding process start-up)",
                            [Table(["Stage", "Seconds"], timing_rows)]))
    return Document(f"Sophon generation report: {summary['experiment']}", sections)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ReportInputError(message)
