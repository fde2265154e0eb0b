"""The attack search: the strongest fine-tuning attacker this pipeline can find for one starting point.

Every start (scratch, original, NTL, Sophon) gets the same budget and picks its own best configurations:
  1. coarse, by successive halving (Optuna): `trials` configurations start, one seed, each fine-tuning for up to
     `coarse_epochs` epochs. After every epoch a run reports the best quality it holds so far; the pruner
     (`halving.pruner`: successive halving, or Hyperband's brackets of it) stops a run at a rung (1, 3, 9, … epochs
     for `min_epochs` 1 and `reduction` 3) unless it is in the best 1/`reduction` of the runs that reached that rung.
     So many configurations get one epoch and the promising ones the longer horizons.
  2. candidates: the `candidate_top` best configurations at each of `candidate_epochs` (and the coarse end), by the
     best quality they held by then (more than one blunts the winner's curse of a single coarse seed), and the
     `confirm_top` best by area among the runs that finished the coarse horizon;
  3. confirm: every candidate at every seed of `seeds`: the area-best for `epochs` epochs (the long horizon), the
     per-epoch candidates for the coarse horizon they won at (the same schedule), so an attack that wins at epochs
     1–3 is measured over seeds where it wins. The envelope (sophon.envelope) takes, at each epoch, the best
     confirmed configuration whose runs reach that epoch.
  4. retest (with `retest_seeds`): each configuration the envelope picks at some epoch, run again at seeds that
     took no part in picking it (to the last epoch it is picked at, on its own horizon's schedule), so the verdict
     can judge the pick without the winner's curse (envelope.retest).

Sampling: strata (strategy × optimiser; optimiser alone from scratch, where no strategy applies) take turns, so
every stratum gets trials in every start; within a trial Optuna's TPE sampler (seeded, one process, sequential:
reproducible) picks the learning rate, batch size, schedule, weight decay and preparation. `trials: 0` (or a
budget as large as the grid) runs the whole grid instead, still by successive halving.

Results are cached per (attack settings, seed, start model, data, core code) under `.cache/`: a rerun after one
value changed replays the cached runs through the same sampler and pruner and computes only what is new.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from sophon.attacks import AttackSettings, finetune
from sophon.envelope import best_so_far, envelope, oriented, score
from sophon.io import code_digest, read_json, write_json

SCRATCH = "scratch"
PREPARATIONS = ("none", "recalibrate_bn", "shrink_perturb")


@dataclass(frozen=True)
class Trial:
    """One attacker configuration."""

    strategy: str
    optimizer: str
    lr: float
    batch_size: int
    schedule: str = "constant"
    weight_decay: float = 0.0
    preparation: str = "none"  # a step before fine-tuning: recalibrate_bn, shrink_perturb@<shrink>/<perturb>

    @property
    def name(self) -> str:
        prepared = "" if self.preparation == "none" else f"+{self.preparation}"
        return (f"{self.strategy}{prepared} {self.optimizer} lr={self.lr:g} bs={self.batch_size} {self.schedule} "
                f"wd={self.weight_decay:g}")

    @property
    def equivalent(self) -> str:
        """The name of the configuration this one trains exactly as (the search tries each once): AdamW without
        weight decay is Adam, and shrink-and-perturb leaves a LoRA start unchanged (sophon.strategies.shrinkable)."""
        optimizer = "adam" if self.optimizer == "adamw" and self.weight_decay == 0 else self.optimizer
        lora_prepared = self.strategy == "lora" and self.preparation.startswith("shrink_perturb@")
        return replace(self, optimizer=optimizer, preparation="none" if lora_prepared else self.preparation).name

    def settings(self, epochs: int, lora_rank: int) -> AttackSettings:
        strategy = "direct+all" if self.strategy == SCRATCH else self.strategy
        extra = {}
        if self.preparation == "recalibrate_bn":
            extra["recalibrate_bn"] = True
        elif self.preparation.startswith("shrink_perturb@"):
            shrink, perturb = self.preparation.removeprefix("shrink_perturb@").split("/")
            extra.update(shrink=float(shrink), perturb=float(perturb))
        elif self.preparation != "none":
            raise ValueError(f"preparation {self.preparation!r} is not none, recalibrate_bn or shrink_perturb@s/p")
        return AttackSettings(strategy=strategy, optimizer=self.optimizer, lr=self.lr, batch_size=self.batch_size,
                              weight_decay=self.weight_decay, epochs=epochs, schedule=self.schedule,
                              lora_rank=lora_rank, **extra)


def lr_values(spec: dict) -> list[float]:
    """`count` log-spaced learning rates from `low` to `high` (3 significant digits)."""
    low, high, count = float(spec["low"]), float(spec["high"]), int(spec["count"])
    if count == 1:
        return [low]
    ratio = (high / low) ** (1 / (count - 1))
    return [float(f"{low * ratio ** i:.3g}") for i in range(count)]


def shrink_perturb_label(setting: dict) -> str:
    return f"shrink_perturb@{float(setting['shrink']):g}/{float(setting['perturb']):g}"


def _preparations(space: dict, start: str) -> list[str]:
    """The preparation axis: `shrink_perturb` becomes one value per setting of `space.shrink_perturb`. From scratch
    only shrink-and-perturb applies, as an init scale (sophon.attacks.finetune): BatchNorm recalibration of a
    fresh model recovers nothing."""
    labels = []
    for name in space.get("preparations", ["none"]):
        if name == "shrink_perturb":
            settings = space.get("shrink_perturb", [{"shrink": 0.5, "perturb": 0.01}])
            labels += [shrink_perturb_label(sp) for sp in settings]
        elif start != SCRATCH or name == "none":
            labels.append(name)
    return labels or ["none"]


def strata(space: dict, start: str) -> list[tuple[str, str]]:
    """(strategy, optimiser) pairs in config order; from scratch the strategy axis collapses."""
    strategies = [SCRATCH] if start == SCRATCH else space["strategies"]
    return list(itertools.product(strategies, space["optimizers"]))


def grid(space: dict, start: str) -> list[Trial]:
    """Every configuration of the space for `start` (from scratch the strategy axis collapses and the preparations
    narrow to init scales), one of each set that trains alike (`Trial.equivalent`: the first in this order)."""
    trials = [Trial(strategy, optimizer, lr, batch_size, schedule, weight_decay, preparation)
              for strategy, optimizer in strata(space, start)
              for lr, batch_size, schedule, weight_decay, preparation in itertools.product(
                  lr_values(space["lrs"][optimizer]), space["batch_sizes"], space["schedules"],
                  space["weight_decays"], _preparations(space, start))]
    return list({t.equivalent: t for t in reversed(trials)}.values())[::-1]


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size)


def top(records: list[dict], k: int, higher_is_better: bool) -> list[dict]:
    """The k best records by score (ties: the earlier record)."""
    ranked = sorted(enumerate(records), key=lambda item: (-score(item[1]["curve"], higher_is_better), item[0]))
    return [record for _, record in ranked[:k]]


def best_at(records: list[dict], epoch: int, higher_is_better: bool, k: int = 1) -> list[dict]:
    """The `k` records holding the best quality by `epoch` (their best checkpoint so far), best first, among records
    that reached it; ties go to the earlier record, NaN never wins."""
    keyed = [(-oriented(best_so_far(record["curve"], higher_is_better)[epoch], higher_is_better), i, record)
             for i, record in enumerate(records) if len(record["curve"]) > epoch]
    return [record for _, _, record in sorted(keyed, key=lambda item: item[:2])[:k]]


# --- the per-run cache ---------------------------------------------------------------------------------------

class RunCache:
    """One JSON file per finished run, keyed by everything that determines its curve: the context (start model,
    data, objective), the attack settings and the seed. From scratch the strategy, LoRA and BatchNorm recalibration
    do not apply, so runs that differ only in them share one entry. A run stopped early by the pruner is stored with
    `complete: false`; it is extended (recomputed) only if a later search promotes it further."""

    def __init__(self, folder: str | Path, context: dict):
        self.folder = Path(folder)
        self.context = {**context, "code": code_digest()}

    def key(self, settings: AttackSettings, seed: int, *, from_scratch: bool) -> str:
        if from_scratch:
            settings = replace(settings, strategy=SCRATCH, lora_rank=0, recalibrate_bn=False)
        blob = json.dumps({**self.context, "settings": asdict(settings), "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        if not path.exists():
            return None
        try:
            record = read_json(path)
        except json.JSONDecodeError:
            return None  # a damaged entry is recomputed
        return record if "curve" in record else None

    def put(self, key: str, record: dict) -> None:
        write_json(self.folder / f"{key}.json", record)


class _Stop(Exception):
    """Raised from a run's epoch callback to end it early (pruned)."""


def cached_finetune(cache: RunCache, build: Callable[[], torch.nn.Module], settings: AttackSettings, seed: int, *,
                    from_scratch: bool, objective, adversary, test, device: torch.device,
                    extra: Callable[[torch.nn.Module], dict] | None = None,
                    keep_going: Callable[[int, float], bool] | None = None) -> tuple[dict, bool]:
    """One fine-tuning run (sophon.attacks.finetune) through the cache: (record, cached). The record holds the
    curve, `complete` (false when `keep_going(epoch, value)` stopped it early), the seconds the run took when it was
    computed, and what `extra(fine-tuned model)` returns (e.g. a diffusion model's denoised images).

    With `keep_going`, a cached curve is replayed through it first: a stop inside the cached part costs nothing; a
    cached run that was stopped earlier than it now should be is computed again (the same seed gives the same
    prefix) and `keep_going` sees only the epochs it has not seen."""
    key = cache.key(settings, seed, from_scratch=from_scratch)
    record = cache.get(key)
    seen = 0
    if record is not None:
        complete = record.get("complete", True)
        if keep_going is None:
            if complete:
                return record, True
        else:
            for epoch, value in enumerate(record["curve"][1:], 1):
                seen = epoch
                if not keep_going(epoch, value):
                    return {**record, "curve": record["curve"][:epoch + 1], "complete": epoch == settings.epochs}, True
            if complete:
                return record, True

    def on_epoch(epoch: int, value: float) -> None:
        if keep_going is not None and epoch > seen and not keep_going(epoch, value):
            raise _Stop

    began = time.perf_counter()
    torch.manual_seed(seed)
    model = build()
    curve: list[float] = []
    complete = True
    try:
        finetune(model, adversary, test, settings, seed=seed, device=device, from_scratch=from_scratch,
                 objective=objective, on_epoch=lambda e, v: (curve.append(v), on_epoch(e, v)))
    except _Stop:
        complete = len(curve) - 1 == settings.epochs
    record = {"curve": curve, "complete": complete, "seconds": time.perf_counter() - began,
              **(extra(model) if extra and complete else {})}
    cache.put(key, record)
    return record, False


# --- the search for one start ----------------------------------------------------------------------------------

def _pruner(halving: dict, coarse_epochs: int):
    import optuna

    if halving.get("pruner", "successive_halving") == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=halving["min_epochs"], max_resource=coarse_epochs,
                                              reduction_factor=halving["reduction"])
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=halving["min_epochs"],
                                                  reduction_factor=halving["reduction"], min_early_stopping_rate=0)


def plan(space: dict, start: str, trials: int) -> list[dict]:
    """The trials' fixed parameters in order: a stratum each, the strata taking turns (the rest sampled), or, when
    the budget covers the grid, every grid configuration in full."""
    full = grid(space, start)
    if trials <= 0 or trials >= len(full):
        return [asdict(t) for t in full]
    pairs = strata(space, start)
    return [dict(zip(("strategy", "optimizer"), pairs[i % len(pairs)])) for i in range(trials)]


def _sample(trial, fixed: dict, space: dict, start: str) -> Trial:
    """Optuna picks what the plan left open (TPE), each optimiser's lr on its own axis."""
    if "lr" in fixed:
        return Trial(**fixed)
    optimizer = fixed["optimizer"]
    return Trial(strategy=fixed["strategy"], optimizer=optimizer,
                 lr=trial.suggest_categorical(f"lr_{optimizer}", lr_values(space["lrs"][optimizer])),
                 batch_size=trial.suggest_categorical("batch_size", list(space["batch_sizes"])),
                 schedule=trial.suggest_categorical("schedule", list(space["schedules"])),
                 weight_decay=trial.suggest_categorical("weight_decay", list(space["weight_decays"])),
                 preparation=trial.suggest_categorical("preparation", _preparations(space, start)))


ATTEMPTS = 20  # proposals per planned trial before its stratum counts as spent


def _tell(study, handle, record: dict) -> None:
    import optuna

    if record["pruned"]:
        study.tell(handle, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(handle, record["score"] if math.isfinite(record["score"]) else -1e9)


def _rank(trial: Trial) -> str:
    return hashlib.sha256(trial.name.encode()).hexdigest()


def _params(trial: Trial) -> dict:
    """The sampler's parameters that give `trial` (see `_sample`)."""
    return {f"lr_{trial.optimizer}": trial.lr, "batch_size": trial.batch_size, "schedule": trial.schedule,
            "weight_decay": trial.weight_decay, "preparation": trial.preparation}


def coarse_search(run: Callable, cfg: dict, start: str, higher: bool) -> list[dict]:
    """Step 1: `run(trial, epochs, keep_going) -> record` for every planned trial under the pruner. Returns the
    coarse records (name, config, curve up to where the run stopped, score, pruned)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    halving, epochs = cfg["halving"], cfg["coarse_epochs"]

    # A fixed study name: Hyperband assigns brackets by a hash of it (a random name would change the cuts per run).
    study = optuna.create_study(study_name="sophon-search", direction="maximize", pruner=_pruner(halving, epochs),
                                sampler=optuna.samplers.TPESampler(seed=cfg["coarse_seed"]))
    records, seen = [], {}  # seen: by Trial.equivalent
    planned = plan(cfg["space"], start, cfg["trials"])
    # The sampler may propose a configuration again, or one that trains exactly as a tried one: it is told the earlier
    # result and asked anew (within a cap), so `trials` configurations that differ in what they train are tried.
    for fixed in planned:
        for _ in range(ATTEMPTS):
            handle = study.ask()
            config = _sample(handle, fixed, cfg["space"], start)
            if config.equivalent not in seen:
                break
            _tell(study, handle, seen[config.equivalent])
        else:  # the sampler keeps proposing tried ones: the stratum's first untried configuration, in a stable order
            left = sorted((t for t in grid(cfg["space"], start) if (t.strategy, t.optimizer) ==
                           (fixed["strategy"], fixed["optimizer"]) and t.equivalent not in seen), key=_rank)
            if not left:
                continue  # every configuration of this stratum is tried
            study.enqueue_trial(_params(left[0]))
            handle = study.ask()
            config = _sample(handle, fixed, cfg["space"], start)
        held = [-math.inf]  # the best quality the run holds so far (its best checkpoint), oriented

        def keep_going(epoch: int, value: float, handle=handle, held=held) -> bool:
            held[0] = max(held[0], oriented(value, higher))
            handle.report(held[0] if math.isfinite(held[0]) else -1e9, epoch)
            return not handle.should_prune()

        curve = run(config, epochs, keep_going)["curve"]
        record = {"name": config.name, "config": asdict(config), "curve": curve,
                  "score": score(curve, higher) if len(curve) > 1 else -math.inf, "pruned": len(curve) - 1 < epochs}
        _tell(study, handle, record)
        seen[config.equivalent] = record
        records.append(record)
    return records


def candidates(coarse: list[dict], cfg: dict, higher: bool) -> list[tuple[dict, int, list[str]]]:
    """Step 2: (coarse record, confirmation horizon, why) for every distinct candidate: the best by area among the
    runs that finished the coarse horizon (long horizon), and the best at each candidate epoch (coarse horizon)."""
    chosen: dict[tuple[str, int], tuple[dict, int, list[str]]] = {}

    def add(record: dict, horizon: int, why: str) -> None:
        entry = chosen.setdefault((record["name"], horizon), (record, horizon, []))
        entry[2].append(why)

    finished = [r for r in coarse if len(r["curve"]) - 1 == cfg["coarse_epochs"]]
    for rank, record in enumerate(top(finished, cfg["confirm_top"], higher), 1):
        add(record, cfg["epochs"], f"area #{rank}")
    for epoch in sorted({*cfg.get("candidate_epochs", []), cfg["coarse_epochs"]}):
        if epoch <= cfg["coarse_epochs"]:
            for rank, record in enumerate(best_at(coarse, epoch, higher, cfg.get("candidate_top", 1)), 1):
                add(record, cfg["coarse_epochs"], f"epoch {epoch}" + (f" #{rank}" if rank > 1 else ""))
    return list(chosen.values())


def run_search(build: Callable[[], torch.nn.Module], objective, adversary, test, cfg: dict, *, start: str,
               device: torch.device, cache: RunCache,
               on_run: Callable[[dict], None] | None = None) -> dict:
    """Coarse search by successive halving, then the candidates confirmed over seeds, for one start. `build()`
    returns a fresh copy of the start's model. `on_run(record)` sees every run (phase, trial, seed, curve, cached).
    Returns the search document."""
    higher = objective.higher_is_better
    lora_rank = cfg["lora_rank"]

    def one(trial: Trial, seed: int, epochs: int, phase: str, keep_going=None) -> dict:
        record, cached = cached_finetune(cache, build, trial.settings(epochs, lora_rank), seed,
                                         from_scratch=start == SCRATCH, objective=objective, adversary=adversary,
                                         test=test, device=device, keep_going=keep_going)
        if on_run is not None:
            on_run({"phase": phase, "trial": trial, "seed": seed, "curve": record["curve"], "cached": cached,
                    "score": score(record["curve"], higher) if len(record["curve"]) > 1 else float("nan")})
        return record

    coarse = coarse_search(lambda t, e, k: one(t, cfg["coarse_seed"], e, "coarse", k), cfg, start, higher)
    confirmed = {}
    for record, horizon, why in candidates(coarse, cfg, higher):
        trial = Trial(**record["config"])
        confirmed[f"{trial.name} | {horizon} ep"] = {
            "config": asdict(trial), "horizon": horizon, "chosen_for": why, "coarse_score": record["score"],
            "steps_per_epoch": steps_per_epoch(len(adversary), trial.batch_size), "seeds": list(cfg["seeds"]),
            "curves": [one(trial, seed, horizon, "confirm")["curve"] for seed in cfg["seeds"]]}
    document = {"start": start, "higher_is_better": higher, "coarse_epochs": cfg["coarse_epochs"],
                "epochs": cfg["epochs"], "tried": len(coarse), "coarse": coarse, "confirmed": confirmed}
    if cfg.get("retest_seeds"):
        # The envelope's pick at each epoch, run again at seeds that took no part in picking it (envelope.retest).
        chosen = envelope({name: entry["curves"] for name, entry in confirmed.items()}, higher, keep_best=True)
        last_picked = {name: epoch for epoch, name in enumerate(chosen["config"])}  # in order of first pick
        runs = {}
        for name, picked in last_picked.items():
            trial, horizon = Trial(**confirmed[name]["config"]), confirmed[name]["horizon"]
            # Each pick runs its own horizon's schedule, stopped after the last epoch it is picked at (beyond its
            # horizon it holds its final best): the curve is that run's exact prefix, at ~60 % of the cost.
            last = max(1, min(horizon, picked))
            runs[name] = [one(trial, seed, horizon, "retest", lambda epoch, _value, last=last: epoch < last)["curve"]
                          for seed in cfg["retest_seeds"]]
        document["retest"] = {"seeds": list(cfg["retest_seeds"]), "runs": runs}
    return document
