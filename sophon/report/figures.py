"""The report's figures (matplotlib, Agg backend), each saved atomically as a PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sophon.io import atomic_path  # noqa: E402
from sophon.layout import STARTS  # noqa: E402

DPI = 120
LABELS = {"scratch": "train from scratch (B1)", "original": "original model (B2)", "ntl": "NTL model (B3)",
          "sophon": "Sophon model"}
COLORS = {"scratch": "tab:gray", "original": "tab:blue", "ntl": "tab:orange", "sophon": "tab:red"}


def _save(fig, path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)


def restricted_accuracy(summary: dict, path) -> None:
    """Restricted-domain accuracy vs fine-tuning epoch, one panel per attack, mean ± std band per start (paper Fig. 3)."""
    attacks = summary["attacks"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.6), sharey=True, squeeze=False)
    for ax, (name, entry) in zip(axes[0], attacks.items()):
        for start in STARTS:
            stats = entry["restricted_accuracy"].get(start)
            if stats is None:
                continue
            epochs = np.arange(len(stats))
            mean = np.array([stats[str(e)]["mean"] for e in epochs])
            std = np.array([stats[str(e)]["std"] for e in epochs])
            ax.plot(epochs, mean, color=COLORS[start], label=LABELS[start], lw=1.6)
            ax.fill_between(epochs, mean - std, mean + std, color=COLORS[start], alpha=0.18, lw=0)
        ax.axhline(summary["chance_accuracy"], color="black", ls="--", lw=1, label="1 / classes")
        ax.set(title=f"{name} ({entry['strategy']}, lr {entry['lr']})", xlabel="fine-tuning epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("restricted-domain accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    _save(fig, path)


def protect_history(history: dict, path) -> None:
    """Sophon's suppression loss per loop (raw and rolling mean) above original-domain accuracy at the checks."""
    loops = np.asarray(history.get("loop", []), dtype=float)
    loss = np.asarray(history.get("suppression_loss", []), dtype=float)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True)
    finite = np.isfinite(loss)
    if finite.any():
        top.plot(loops[finite], loss[finite], color="tab:red", alpha=0.25, lw=0.8, label="per loop")
        window = max(1, int(finite.sum()) // 20)
        if window > 1:
            rolling = np.convolve(loss[finite], np.ones(window) / window, mode="valid")
            top.plot(loops[finite][window - 1:], rolling, color="tab:red", lw=1.8, label=f"rolling mean of {window}")
        top.legend(fontsize=8)
    skipped = f", {int((~finite).sum())} non-finite loops not drawn" if (~finite).any() else ""
    top.set(ylabel="suppression loss", title=f"Sophon protection: fine-tuning suppression{skipped}")
    draw_checks(top, bottom, history.get("checks", []), "original-domain accuracy at check", "original-domain accuracy (%)")
    _save(fig, path)


def draw_checks(top, bottom, checks: list[dict], label: str, ylabel: str) -> None:
    """The lower panel of a protect-history figure: original-domain quality at each check, rollbacks marked."""
    bottom.plot([c["loop"] for c in checks], [c["quality"] for c in checks], "o-", color="tab:blue", ms=4, label=label)
    rolled = [c for c in checks if c.get("rolled_back")]
    if rolled:
        bottom.plot([c["loop"] for c in rolled], [c["quality"] for c in rolled], "x", color="black", ms=9, mew=2,
                    label=f"rollback ({len(rolled)})")
    bottom.set(xlabel="loop", ylabel=ylabel)
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)


def sweep(sweep_summary: dict, path) -> None:
    """The learning-rate sweep: score vs lr (log axis, best marked) and the curves themselves."""
    lrs = sorted(sweep_summary["lrs"], key=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot([float(lr) for lr in lrs], [sweep_summary["lrs"][lr] for lr in lrs], "o-", color="tab:blue")
    best = sweep_summary["best_lr"]
    if best is not None:
        left.axvline(float(best), color="tab:green", ls="--", lw=1, label=f"best lr {best}")
        left.legend(fontsize=8)
    left.set(xscale="log", xlabel="learning rate", ylabel="score: mean acc. epochs 1..E (%)",
             title="sweep (original model)")
    for lr in lrs:
        curve = sweep_summary["curves"][lr]
        right.plot(range(len(curve)), curve, label=f"lr {lr}")
    right.set(xlabel="fine-tuning epoch", ylabel="restricted-domain accuracy (%)", title="sweep curves")
    right.legend(fontsize=7)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _save(fig, path)


def envelopes(envelope_doc: dict, path, *, ylabel: str, title: str, early: int = 10) -> None:
    """The attacker's envelope per start: best configuration's mean vs fine-tuning epoch, ± std band over seeds; the
    picks' retest at held-out seeds dotted, the red-team suite dashed. Left: every epoch; right: the first `early`
    epochs, where the starts differ most."""
    starts = envelope_doc["starts"]
    order = [s for s in STARTS if s in starts] + [s for s in starts if s not in STARTS]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
    for ax in axes:
        for start in order:
            env = starts[start]
            mean = np.asarray(env["mean"], dtype=float)
            std = np.asarray(env["std"], dtype=float)
            epochs = np.arange(len(mean))
            ax.plot(epochs, mean, color=COLORS.get(start), label=LABELS.get(start, start), lw=1.6)
            ax.fill_between(epochs, mean - std, mean + std, color=ax.lines[-1].get_color(), alpha=0.18, lw=0)
        retest = envelope_doc.get("retest") or {}
        for start in [s for s in order if s in retest.get("starts", {})]:  # the picks at held-out seeds, dotted
            mean = retest["starts"][start]["mean"]
            ax.plot(np.arange(len(mean)), mean, ls=":", lw=1.4, color=COLORS.get(start),
                    label=f"{LABELS.get(start, start)}, retest at seeds {', '.join(map(str, retest['seeds'] or []))}")
        for start, attacks in envelope_doc.get("redteam", {}).items():  # the red-team suite, dashed, for comparison
            for name, attack in attacks.items():
                mean = attack["vs_envelope"]["mean"]
                ax.plot(np.arange(len(mean)), mean, ls="--", lw=0.9, alpha=0.8,
                        label=f"red team: {name} ({LABELS.get(start, start)})")
        if "chance_level" in envelope_doc:  # the constant-answer attacker every envelope holds
            ax.axhline(envelope_doc["chance_level"], color="grey", ls="-.", lw=0.9,
                       label=f"constant answer ({envelope_doc['chance_level']:.1f}%)")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="fine-tuning epoch")
        if envelope_doc.get("higher_is_better") is False:  # MSE: the starts differ by factors, not points
            ax.set_yscale("log")
    axes[0].set(title=title, ylabel=ylabel)
    axes[1].set(title=f"the first {early} epochs", xlim=(0, early))
    axes[0].legend(fontsize=6 if envelope_doc.get("redteam") else 8, loc="best")
    _save(fig, path)
