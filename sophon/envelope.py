"""The attacker's envelope over an attack search, and the numbers the report states about it (pure: numpy only).

An attack search fine-tunes each starting point with many attacker configurations. Each configuration (a name)
gives one per-epoch curve of the restricted-domain metric (epochs 0..E) per seed. The metric is either
higher-is-better for the attacker (accuracy, %) or lower-is-better (MSE); every function takes
`higher_is_better` and orients its result so that "larger gain / score" always means "stronger attacker".

Conventions shared by all functions:
  * std is the population standard deviation over seeds (numpy, ddof=0); one seed gives 0.0.
  * Ties go to the first candidate in iteration order (dict order of configurations, first epoch, first record).
  * A non-finite value (NaN from a diverged run) is never preferred over a finite one; it never "reaches" a
    target and never satisfies a rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from sophon.errors import SophonError


class EnvelopeInputError(SophonError, ValueError):
    """Curves handed to the envelope functions are empty or of inconsistent length."""


def oriented(value: float, higher_is_better: bool) -> float:
    """The value on a larger-is-stronger-attacker scale; NaN becomes -inf so it never wins a comparison."""
    value = float(value)
    if math.isnan(value):
        return -math.inf
    return value if higher_is_better else -value


def _argbest(values: Sequence[float], higher_is_better: bool) -> int:
    """Index of the best value for the attacker, first on ties, NaN never preferred over a finite value."""
    best, best_key = 0, None
    for i, value in enumerate(values):
        key = oriented(value, higher_is_better)
        if best_key is None or key > best_key:
            best, best_key = i, key
    return best


def score(curve: Sequence[float], higher_is_better: bool) -> float:
    """How strong one fine-tune is: the mean of the curve over epochs 1..E (area under it), negated when
    lower is better, so a larger score is always a stronger attacker. Needs at least epochs 0 and 1."""
    values = np.asarray(curve, dtype=float)
    if values.ndim != 1 or len(values) < 2:
        raise EnvelopeInputError(f"a curve needs epochs 0..E with E >= 1, got {len(np.atleast_1d(values))} point(s)")
    area = float(values[1:].mean())
    return area if higher_is_better else -area


def best_so_far(curve: Sequence[float], higher_is_better: bool) -> list[float]:
    """The best value a run holds by each epoch: an attacker keeps its best checkpoint so far (early stopping on
    what it wants), so a later dip of its training curve costs it nothing. NaN epochs keep the previous best (NaN
    until a finite value comes)."""
    out, best = [], math.nan
    for value in curve:
        value = float(value)
        if not math.isnan(value) and (math.isnan(best) or oriented(value, higher_is_better) > oriented(best, higher_is_better)):
            best = value
        out.append(best)
    return out


def envelope(runs: Mapping[str, Sequence[Sequence[float]]], higher_is_better: bool, *, keep_best: bool = False) -> dict:
    """The attacker's best configuration at each epoch.

    `runs` maps a configuration name to its seed curves (each epochs 0..E_c; one length per configuration). With
    `keep_best` every seed curve is first replaced by its `best_so_far` (the attacker keeps its best checkpoint), and
    epoch e is a budget: an attacker allowed e epochs may stop at E_c < e, so a configuration confirmed at a shorter
    horizon holds its final best beyond it, and the envelope never falls. Without, the value at epoch e is the last
    checkpoint's and only the configurations whose curves reach e compete. At each epoch the one whose seed-mean is
    best there is picked (first in `runs` order on ties); the result, over epochs 0..max E_c, holds that configuration's
    seed-mean, population std over its seeds and name: ``{"mean": [...], "std": [...], "config": [...]}``.
    """
    if not runs:
        raise EnvelopeInputError("envelope of no configurations")
    names = list(runs)
    means, stds = zip(*(_seed_stats(name, runs[name], higher_is_better, keep_best) for name in names))
    if keep_best:  # a budget: the shorter configurations stop at their horizon and keep their best
        longest = max(len(m) for m in means)
        means = [np.pad(m, (0, longest - len(m)), mode="edge") for m in means]
        stds = [np.pad(d, (0, longest - len(d)), mode="edge") for d in stds]
    out = {"mean": [], "std": [], "config": []}
    for e in range(max(len(m) for m in means)):
        here = [i for i, m in enumerate(means) if len(m) > e]
        i = here[_argbest([means[j][e] for j in here], higher_is_better)]
        out["mean"].append(float(means[i][e]))
        out["std"].append(float(stds[i][e]))
        out["config"].append(names[i])
    return out


def _seed_stats(name: str, seeds: Sequence[Sequence[float]], higher_is_better: bool,
                keep_best: bool) -> tuple[np.ndarray, np.ndarray]:
    """One configuration's seed-mean and population std (0.0 for one seed) per epoch."""
    if keep_best:
        seeds = [best_so_far(curve, higher_is_better) for curve in seeds]
    lengths = {len(curve) for curve in seeds}
    if len(lengths) > 1:
        raise EnvelopeInputError(f"configuration {name!r}: its seed curves differ in length ({sorted(lengths)})")
    curves = np.asarray(seeds, dtype=float)
    if curves.ndim != 2 or curves.shape[0] == 0 or curves.shape[1] == 0:
        raise EnvelopeInputError(f"configuration {name!r}: expected a non-empty list of equal-length seed curves")
    return curves.mean(axis=0), curves.std(axis=0)


def retest(chosen: Mapping, runs: Mapping[str, Sequence[Sequence[float]]], higher_is_better: bool) -> dict:
    """The envelope's choice measured again on seeds that did not choose it.

    An envelope picks, at each epoch, the configuration whose seed-mean is best there: the maximum of many noisy
    means, biased up by the choice (the winner's curse), and more so for a start whose runs vary more. Here each
    epoch keeps the configuration `chosen` (an `envelope(..., keep_best=True)`) picked, and takes its mean ± std over
    `runs[config]`: its seed curves at other seeds (best checkpoint so far, a shorter horizon keeping its final best
    beyond it). Same shape as `envelope`."""
    missing = sorted(set(chosen["config"]) - set(runs))
    if missing:
        raise EnvelopeInputError(f"retest: no runs of the chosen configuration(s) {missing}")
    stats = {name: _seed_stats(name, runs[name], higher_is_better, True) for name in set(chosen["config"])}
    out = {"mean": [], "std": [], "config": list(chosen["config"])}
    for e, name in enumerate(chosen["config"]):
        mean, std = stats[name]
        out["mean"].append(float(mean[min(e, len(mean) - 1)]))
        out["std"].append(float(std[min(e, len(std) - 1)]))
    return out


CONSTANT_ANSWER = "constant answer"


def with_constant_answer(envelope: Mapping, value: float, higher_is_better: bool) -> dict:
    """The envelope with one more attacker in it: the one that answers one fixed class for every input and scores
    `value` (the best such class's share of the test set) at every epoch, with no seed spread. Where `value` beats
    the pick's mean it becomes the pick (std 0, config CONSTANT_ANSWER); elsewhere the envelope is unchanged.
    Every start can answer a constant, so judging two envelopes both with it removes gains that come only from which
    class a model collapsed onto. Other keys of `envelope` are kept."""
    out = {**envelope, "mean": list(envelope["mean"]), "std": list(envelope["std"]), "config": list(envelope["config"])}
    for e, mean in enumerate(out["mean"]):
        if oriented(value, higher_is_better) > oriented(mean, higher_is_better):
            out["mean"][e], out["std"][e], out["config"][e] = float(value), 0.0, CONSTANT_ANSWER
    return out


def _gains(sophon_env: Mapping, scratch_env: Mapping, higher_is_better: bool) -> list[float]:
    sophon, scratch = list(sophon_env["mean"]), list(scratch_env["mean"])
    if len(sophon) != len(scratch) or not sophon:
        raise EnvelopeInputError(f"envelopes differ in length or are empty: Sophon {len(sophon)}, scratch {len(scratch)}")
    sign = 1.0 if higher_is_better else -1.0
    return [sign * (float(s) - float(c)) for s, c in zip(sophon, scratch)]


def advantage(sophon_env: Mapping, scratch_env: Mapping, higher_is_better: bool) -> dict:
    """What starting from Sophon gains the attacker over starting from scratch, per epoch.

    The gain is sophon − scratch (accuracy points) when higher is better and scratch − sophon (MSE) when lower is
    better, so a positive gain always means Sophon helped the attacker. Returns
    ``{"value": max gain, "epoch": its first epoch, "per_epoch": [gain at each epoch 0..E]}``
    (NaN gains are never chosen over finite ones).
    """
    gains = _gains(sophon_env, scratch_env, higher_is_better)
    epoch = _argbest(gains, True)
    return {"value": gains[epoch], "epoch": epoch, "per_epoch": gains}


def holds(sophon_env: Mapping, scratch_env: Mapping, higher_is_better: bool, k: float = 1.0) -> dict:
    """Whether Sophon's protection holds against the attacker's envelope.

    It holds when at every epoch 0..E the gain (see `advantage`) is at most k · sqrt(std_sophon² + std_scratch²),
    i.e. Sophon does not help the attacker by more than the seeds' spread. The boundary itself holds (≤); a NaN
    gain or spread is a violation. Returns ``{"holds": bool, "violations": [epochs], "rule": str}``.
    """
    gains = _gains(sophon_env, scratch_env, higher_is_better)
    s_std, c_std = list(sophon_env["std"]), list(scratch_env["std"])
    if not len(s_std) == len(c_std) == len(gains):
        raise EnvelopeInputError("an envelope's std has a different length from its mean")
    violations = [e for e, (gain, a, b) in enumerate(zip(gains, s_std, c_std))
                  if not gain <= k * math.sqrt(float(a) ** 2 + float(b) ** 2)]
    metric = "accuracy" if higher_is_better else "MSE"
    rule = (f"Sophon holds when, at every fine-tuning epoch, the best attacker starting from the Sophon model beats "
            f"the best attacker training from scratch by at most {k:g} x sqrt(std_sophon^2 + std_scratch^2) in "
            f"restricted-domain {metric}, i.e. by no more than the seeds' spread.")
    return {"holds": not violations, "violations": violations, "rule": rule}


def _spread(a: Mapping, b: Mapping, k: float) -> list[float]:
    return [k * math.sqrt(float(x) ** 2 + float(y) ** 2) for x, y in zip(a["std"], b["std"])]


def head_start(original_env: Mapping, scratch_env: Mapping, higher_is_better: bool, k: float = 1.0) -> dict:
    """What the original (unprotected) model gives the attacker over training from scratch: the thing Sophon exists
    to take away. Per epoch, original − scratch (accuracy points; scratch − original for MSE), its largest value and
    first epoch, the seeds' spread k·sqrt(std_original² + std_scratch²) per epoch, and `something_to_protect`: true
    when the head start exceeds the spread at some epoch. Without that, "holds" protects nothing."""
    gains = _gains(original_env, scratch_env, higher_is_better)
    spread = _spread(original_env, scratch_env, k)
    epoch = _argbest(gains, True)
    beyond = [e for e, (g, s) in enumerate(zip(gains, spread)) if g > s]
    return {"per_epoch": gains, "value": gains[epoch], "epoch": epoch, "spread": spread,
            "beyond_spread": beyond, "something_to_protect": bool(beyond)}


def removed(original_env: Mapping, scratch_env: Mapping, sophon_env: Mapping, higher_is_better: bool,
            k: float = 1.0) -> list[float | None]:
    """Per epoch, the share of the original's head start that Sophon takes away: (original − Sophon) / (original −
    scratch), oriented so that 1 means Sophon is as hard to fine-tune as scratch, 0 as easy as the original, above 1
    harder than scratch, below 0 easier than the original. None where the head start is within the seeds' spread
    (nothing to remove there)."""
    start = _gains(original_env, scratch_env, higher_is_better)
    taken = _gains(original_env, sophon_env, higher_is_better)
    spread = _spread(original_env, scratch_env, k)
    return [float(t / h) if h > s and h > 0 else None for t, h, s in zip(taken, start, spread)]


def covers(env: Mapping, seed_curves: Sequence[Sequence[float]], higher_is_better: bool, k: float = 1.0) -> dict:
    """Whether an envelope covers one attack run at several seeds (a red-team attack): at every epoch both have, the
    attack's seed-mean (best checkpoint so far) beats the envelope by at most k · sqrt(std_env² + std_attack²).
    Returns ``{"covered": bool, "violations": [epochs], "excess": [attack − envelope per epoch, oriented],
    "max_excess": float, "epoch": its first epoch, "mean": [...], "std": [...]}`` (the attack's best-so-far stats)."""
    curves = np.asarray([best_so_far(c, higher_is_better) for c in seed_curves], dtype=float)
    if curves.ndim != 2 or curves.size == 0:
        raise EnvelopeInputError("covers() needs a non-empty list of equal-length seed curves")
    mean, std = curves.mean(axis=0), curves.std(axis=0)
    epochs = min(len(mean), len(env["mean"]))
    sign = 1.0 if higher_is_better else -1.0
    excess = [sign * (float(mean[e]) - float(env["mean"][e])) for e in range(epochs)]
    bound = [k * math.sqrt(float(env["std"][e]) ** 2 + float(std[e]) ** 2) for e in range(epochs)]
    violations = [e for e in range(epochs) if not excess[e] <= bound[e]]
    epoch = _argbest(excess, True)
    return {"covered": not violations, "violations": violations, "excess": excess, "max_excess": excess[epoch],
            "epoch": epoch, "mean": [float(x) for x in mean], "std": [float(x) for x in std]}


def steps_to_reach(mean_curve: Sequence[float], steps_per_epoch: int, target: float, higher_is_better: bool) -> int | None:
    """Attacker optimiser steps (epoch × steps_per_epoch) of the first epoch whose value reaches `target`
    (≥ when higher is better, ≤ when lower is better); 0 if the untrained epoch 0 already does; None if never."""
    for epoch, value in enumerate(mean_curve):
        value = float(value)
        if math.isnan(value):
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return epoch * int(steps_per_epoch)
    return None


def _cost(runs: Sequence[tuple[Sequence[float], int]], target: float, higher_is_better: bool) -> int | None:
    costs = [steps_to_reach(curve, spe, target, higher_is_better) for curve, spe in runs]
    costs = [c for c in costs if c is not None]
    return min(costs) if costs else None


def cost_ratio(sophon_runs: Sequence[tuple[Sequence[float], int]], scratch_runs: Sequence[tuple[Sequence[float], int]],
               target: float, higher_is_better: bool) -> float | None:
    """How many times more optimiser steps the attacker needs to reach `target` from Sophon than from scratch.

    Each argument lists (mean_curve, steps_per_epoch) for every confirmed configuration of that start; a start's
    cost is the fewest steps any of its configurations needs (`steps_to_reach`). Returns sophon cost / scratch cost,
    or None when the ratio is not a finite number:
      * Sophon never reaches the target (protection not broken within the budget: report "not reached");
      * scratch never reaches it either (the target is beyond the attacker's budget, nothing to compare with);
      * scratch reaches it at step 0 but Sophon needs steps (the target is trivial for an untrained model, so the
        ratio is undefined; pick a higher target). When both reach it at step 0 the ratio is 1.0.
    Never returns inf.
    """
    sophon = _cost(sophon_runs, target, higher_is_better)
    scratch = _cost(scratch_runs, target, higher_is_better)
    if sophon is None or scratch is None:
        return None
    if scratch == 0:
        return 1.0 if sophon == 0 else None
    return sophon / scratch


def default_target(scratch_env: Mapping, higher_is_better: bool, fraction: float = 0.9) -> float:
    """The stated target for `cost_ratio`: what the attacker must reach, relative to the best training from scratch.

    Accuracy (higher is better): fraction × max(scratch envelope mean), e.g. 90 % of scratch's best accuracy.
    MSE (lower is better): min(scratch envelope mean) / fraction, e.g. within a factor 1/0.9 of scratch's best MSE.
    No chance correction. NaN epochs are ignored; 0 < fraction ≤ 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise EnvelopeInputError(f"fraction must be in (0, 1], got {fraction}")
    mean = np.asarray(scratch_env["mean"], dtype=float)
    mean = mean[~np.isnan(mean)]
    if mean.size == 0:
        raise EnvelopeInputError("scratch envelope has no finite value to set a target from")
    return float(fraction * mean.max()) if higher_is_better else float(mean.min() / fraction)


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def slice_table(records: Sequence[Mapping], axis: str, higher_is_better: bool) -> dict:
    """One axis of the attack search as a table: for each start and each value of config[axis], the best score
    (`score`) over all other axes, and the name of the configuration that gave it.

    `records` are the coarse search's runs (one seed each): ``{"start", "config": {...}, "name", "curve"}``. Returns
    ``{start: {axis_value: {"score": float, "config": name}}}``, starts in first-seen order, axis values sorted
    (numbers ascending, then others by their text); ties go to the first record. With axis "optimizer", "lr" or
    "batch_size" this renders the paper's Tables V, VI and VII as slices of the search.
    """
    best: dict = {}
    for record in records:
        config = record["config"]
        if axis not in config:
            raise EnvelopeInputError(f"record {record.get('name')!r} ({record.get('start')}) has no {axis!r} in its config")
        value = config[axis]
        s = score(record["curve"], higher_is_better)
        cell = best.setdefault(record["start"], {}).get(value)
        if cell is None or oriented(s, True) > oriented(cell["score"], True):
            best[record["start"]][value] = {"score": s, "config": record["name"]}
    return {start: {v: cells[v] for v in sorted(cells, key=_sort_key)} for start, cells in best.items()}
