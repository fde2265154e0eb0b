"""The attack search: the strongest fine-tuning attacker this pipeline can find for one starting point.

Every start (scratch, original, NTL, Sophon) gets the same budget and picks its own best configurations:
  1. coarse: `trials` configurations of the search space, one seed, `coarse_epochs` epochs, scored by the area
     under the quality-vs-epoch curve (sophon.envelope.score: rewards speed and end point);
  2. confirm: the `confirm_top` best of them, every seed of `seeds`, `epochs` epochs (the long horizon).

The space is a grid (strategies × optimisers × per-optimiser log-spaced lrs × batch sizes × schedules × weight
decays). `trials` picks a balanced, stable subsample of it: the grid is cut into strata (strategy × optimiser;
optimiser alone from scratch, where no strategy applies), each stratum ranks its configurations by a hash of
their names, and the strata take turns giving their next-ranked configuration until the budget is spent. The
same configuration therefore gets the same rank in every start and every run, and changing one value (say
adam's lrs) changes only the strata it touches. `trials: 0` runs the whole grid.

Results are cached per (attack settings, seed, start model, data, core code) under `.cache/`: a rerun
after one value changed computes only the new configurations, and start-up is paid once per start, not per
configuration.
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
from sophon.envelope import score
from sophon.io import code_digest, read_json, write_json

SCRATCH = "scratch"


@dataclass(frozen=True)
class Trial:
    """One attacker configuration."""

    strategy: str
    optimizer: str
    lr: float
    batch_size: int
    schedule: str = "constant"
    weight_decay: float = 0.0

    @property
    def name(self) -> str:
        return (f"{self.strategy} {self.optimizer} lr={self.lr:g} bs={self.batch_size} {self.schedule} "
                f"wd={self.weight_decay:g}")

    def settings(self, epochs: int, lora_rank: int) -> AttackSettings:
        strategy = "direct+all" if self.strategy == SCRATCH else self.strategy
        return AttackSettings(strategy=strategy, optimizer=self.optimizer, lr=self.lr, batch_size=self.batch_size,
                              weight_decay=self.weight_decay, epochs=epochs, schedule=self.schedule,
                              lora_rank=lora_rank)


def lr_values(spec: dict) -> list[float]:
    """`count` log-spaced learning rates from `low` to `high` (3 significant digits)."""
    low, high, count = float(spec["low"]), float(spec["high"]), int(spec["count"])
    if count == 1:
        return [low]
    ratio = (high / low) ** (1 / (count - 1))
    return [float(f"{low * ratio ** i:.3g}") for i in range(count)]


def grid(space: dict, start: str) -> list[Trial]:
    """Every configuration of the space for `start` (from scratch the strategy axis collapses)."""
    strategies = [SCRATCH] if start == SCRATCH else space["strategies"]
    return [Trial(strategy, optimizer, lr, batch_size, schedule, weight_decay)
            for strategy, optimizer in itertools.product(strategies, space["optimizers"])
            for lr, batch_size, schedule, weight_decay in itertools.product(
                lr_values(space["lrs"][optimizer]), space["batch_sizes"], space["schedules"], space["weight_decays"])]


def _rank(trial: Trial) -> str:
    return hashlib.sha256(trial.name.encode()).hexdigest()


def design(space: dict, start: str, trials: int) -> list[Trial]:
    """The balanced, stable subsample of the grid described in the module docstring (all of it if trials ≤ 0)."""
    full = grid(space, start)
    if trials <= 0 or trials >= len(full):
        return full
    strata: dict[tuple, list[Trial]] = {}
    for trial in full:
        strata.setdefault((trial.strategy, trial.optimizer), []).append(trial)
    queues = [sorted(members, key=_rank) for members in strata.values()]
    chosen: list[Trial] = []
    for depth in range(max(len(q) for q in queues)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < trials:
                chosen.append(queue[depth])
    return chosen


def steps_per_epoch(samples: int, batch_size: int) -> int:
    return math.ceil(samples / batch_size)


def top(records: list[dict], k: int, higher_is_better: bool) -> list[dict]:
    """The k best coarse records by score (ties: the earlier record)."""
    ranked = sorted(enumerate(records), key=lambda item: (-score(item[1]["curve"], higher_is_better), item[0]))
    return [record for _, record in ranked[:k]]


# --- the per-run cache ---------------------------------------------------------------------------------------

class RunCache:
    """One JSON file per finished run, keyed by everything that determines its curve: the context (start model,
    data, objective), the attack settings and the seed. From scratch the strategy does not apply, so runs that
    differ only in it share one entry."""

    def __init__(self, folder: str | Path, context: dict):
        self.folder = Path(folder)
        self.context = {**context, "code": code_digest()}

    def key(self, settings: AttackSettings, seed: int, *, from_scratch: bool) -> str:
        if from_scratch:
            settings = replace(settings, strategy=SCRATCH, lora_rank=0)
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


def cached_finetune(cache: RunCache, build: Callable[[], torch.nn.Module], settings: AttackSettings, seed: int, *,
                    from_scratch: bool, objective, adversary, test, device: torch.device,
                    extra: Callable[[torch.nn.Module], dict] | None = None) -> tuple[dict, bool]:
    """One fine-tuning run (sophon.attacks.finetune) through the cache: (record, cached). The record holds the
    curve, the seconds the run took when it was computed, and what `extra(fine-tuned model)` returns (e.g. a
    diffusion model's denoised images)."""
    key = cache.key(settings, seed, from_scratch=from_scratch)
    record = cache.get(key)
    if record is not None:
        return record, True
    began = time.perf_counter()
    torch.manual_seed(seed)
    model = build()
    curve = finetune(model, adversary, test, settings, seed=seed, device=device, from_scratch=from_scratch,
                     objective=objective)
    record = {"curve": curve, "seconds": time.perf_counter() - began, **(extra(model) if extra else {})}
    cache.put(key, record)
    return record, False


# --- the search for one start ----------------------------------------------------------------------------------

def run_search(build: Callable[[], torch.nn.Module], objective, adversary, test, cfg: dict, *, start: str,
               device: torch.device, cache: RunCache,
               on_run: Callable[[dict], None] | None = None) -> dict:
    """Coarse search then confirmation for one start. `build()` returns a fresh copy of the start's model.
    `on_run(record)` sees every run (phase, trial, seed, curve, cached). Returns the search document."""
    higher = objective.higher_is_better
    lora_rank = cfg["lora_rank"]

    def one(trial: Trial, seed: int, epochs: int, phase: str) -> list[float]:
        record, cached = cached_finetune(cache, build, trial.settings(epochs, lora_rank), seed,
                                         from_scratch=start == SCRATCH, objective=objective, adversary=adversary,
                                         test=test, device=device)
        if on_run is not None:
            on_run({"phase": phase, "trial": trial, "seed": seed, "curve": record["curve"], "cached": cached,
                    "score": score(record["curve"], higher)})
        return record["curve"]

    coarse = [{"name": t.name, "config": asdict(t), "curve": one(t, cfg["coarse_seed"], cfg["coarse_epochs"], "coarse")}
              for t in design(cfg["space"], start, cfg["trials"])]
    for record in coarse:
        record["score"] = score(record["curve"], higher)
    confirmed = {}
    for record in top(coarse, cfg["confirm_top"], higher):
        trial = Trial(**record["config"])
        confirmed[trial.name] = {
            "config": asdict(trial), "coarse_score": record["score"],
            "steps_per_epoch": steps_per_epoch(len(adversary), trial.batch_size),
            "seeds": list(cfg["seeds"]),
            "curves": [one(trial, seed, cfg["epochs"], "confirm") for seed in cfg["seeds"]]}
    return {"start": start, "higher_is_better": higher, "coarse_epochs": cfg["coarse_epochs"],
            "epochs": cfg["epochs"], "coarse": coarse, "confirmed": confirmed}
