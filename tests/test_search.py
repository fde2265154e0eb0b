"""The attack search: its design over the space, the planted best found on a toy case, the per-run cache."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from sophon.data import ImageSet
from sophon.objectives import ClassificationObjective
from sophon.search import RunCache, Trial, design, grid, lr_values, run_search

SPACE = {"strategies": ["direct+all", "initFC+all", "lora"], "optimizers": ["adam", "momentum"],
         "lrs": {"adam": {"low": 1e-4, "high": 1e-2, "count": 3}, "momentum": {"low": 1e-3, "high": 1e-1, "count": 3}},
         "batch_sizes": [8, 32], "schedules": ["constant", "cosine"], "weight_decays": [0.0]}


def test_lr_values_are_log_spaced():
    assert lr_values({"low": 1e-4, "high": 1e-2, "count": 3}) == [1e-4, 1e-3, 1e-2]
    assert lr_values({"low": 0.01, "high": 0.1, "count": 3}) == [0.01, 0.0316, 0.1]
    assert lr_values({"low": 0.5, "high": 0.5, "count": 1}) == [0.5]


def test_grid_and_design_are_balanced_stable_and_fair():
    full = grid(SPACE, "sophon")
    assert len(full) == 3 * 2 * 3 * 2 * 2 and len(set(full)) == len(full)
    assert {t.strategy for t in grid(SPACE, "scratch")} == {"scratch"} and len(grid(SPACE, "scratch")) == 24
    assert design(SPACE, "sophon", 0) == full  # 0: the whole grid

    chosen = design(SPACE, "sophon", 12)
    pairs = Counter((t.strategy, t.optimizer) for t in chosen)
    assert len(chosen) == 12 and set(pairs.values()) == {2}  # every strategy × optimiser pair twice
    assert design(SPACE, "original", 12) == chosen  # every pretrained start runs the same configurations
    assert Counter(t.optimizer for t in design(SPACE, "scratch", 12)) == {"adam": 6, "momentum": 6}

    # Changing adam's lrs changes only the adam strata.
    changed = {**SPACE, "lrs": {**SPACE["lrs"], "adam": {"low": 2e-4, "high": 2e-2, "count": 3}}}
    after = design(changed, "sophon", 12)
    assert [t for t in after if t.optimizer == "momentum"] == [t for t in chosen if t.optimizer == "momentum"]
    assert [t for t in after if t.optimizer == "adam"] != [t for t in chosen if t.optimizer == "adam"]


def _toy():
    """Four classes of 4×4 single-channel images: class k has its k-th quadrant bright (chance: 25 %)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 4
    images = torch.randint(0, 60, (96, 1, 4, 4), generator=g)
    for i, k in enumerate(labels.tolist()):
        images[i, 0, 2 * (k // 2):2 * (k // 2) + 2, 2 * (k % 2):2 * (k % 2) + 2] += 150
    images, classes = images.to(torch.uint8), tuple("abcd")
    return ImageSet(images[:64], labels[:64], classes), ImageSet(images[64:], labels[64:], classes)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x.flatten(1) - 0.5)


def test_search_finds_the_planted_best_and_caches_every_run(tmp_path):
    train, test = _toy()
    # An lr of 1e-6 learns nothing in 3 epochs; 0.3 separates the classes at once: the planted best.
    space = {"strategies": ["direct+all"], "optimizers": ["sgd"], "lrs": {"sgd": {"low": 1e-6, "high": 0.3, "count": 2}},
             "batch_sizes": [16], "schedules": ["constant"], "weight_decays": [0.0]}
    cfg = {"space": space, "trials": 0, "coarse_epochs": 3, "coarse_seed": 0, "confirm_top": 1, "epochs": 4,
           "seeds": [0, 1], "lora_rank": 2}
    objective = ClassificationObjective(device=torch.device("cpu"))
    cache = RunCache(tmp_path, {"toy": 1})
    seen = []
    doc = run_search(Tiny, objective, train, test, cfg, start="scratch", device=torch.device("cpu"), cache=cache,
                     on_run=seen.append)
    best = Trial("scratch", "sgd", 0.3, 16)
    assert list(doc["confirmed"]) == [best.name]
    confirmed = doc["confirmed"][best.name]
    assert confirmed["steps_per_epoch"] == 4 and len(confirmed["curves"]) == 2
    assert all(len(c) == 5 and c[-1] == 100.0 for c in confirmed["curves"])
    slow = next(r for r in doc["coarse"] if r["config"]["lr"] == 1e-6)
    assert max(slow["curve"]) < 60.0
    assert [r["phase"] for r in seen] == ["coarse", "coarse", "confirm", "confirm"]
    assert not any(r["cached"] for r in seen)

    again = []
    assert run_search(Tiny, objective, train, test, cfg, start="scratch", device=torch.device("cpu"), cache=cache,
                      on_run=again.append) == doc
    assert all(r["cached"] for r in again)
    # Another context (another start model, say) never reuses these runs.
    other = RunCache(tmp_path, {"toy": 2})
    settings = best.settings(4, 2)
    key = cache.key(settings, 0, from_scratch=True)
    assert other.key(settings, 0, from_scratch=True) != key and other.get(other.key(settings, 0, from_scratch=True)) is None
    # From scratch the strategy does not apply: paired attacks that differ only in it share one run.
    assert cache.key(replace(settings, strategy="initFC+FC"), 0, from_scratch=True) == key
    assert cache.key(replace(settings, strategy="initFC+FC"), 0, from_scratch=False) != cache.key(settings, 0, from_scratch=False)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_trial_settings_carry_the_schedule(schedule):
    settings = Trial("scratch", "adamw", 1e-3, 8, schedule, 0.01).settings(epochs=5, lora_rank=4)
    assert settings.strategy == "direct+all" and settings.schedule == schedule and settings.weight_decay == 0.01


def test_run_cache_key_follows_the_objective_settings(tmp_path, monkeypatch):
    """A diffusion run measured with other noise repeats or augmentation is another run, never a cache hit."""
    import json

    from sophon import layout
    from stages.common import run_cache

    monkeypatch.chdir(tmp_path)
    manifest = layout.split_manifest("gen")
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"parts": {p: {"sha256": p} for p in ("adversary", "restricted_test")}}))
    exp = {"name": "gen", "unet": {"layers": 1}, "eval": {"seed": 0, "repeats": 8}, "augment": {"flip": True}}
    settings = Trial("scratch", "adam", 1e-3, 8).settings(2, 4)
    key = run_cache(exp, "scratch", object()).key(settings, 0, from_scratch=True)
    fewer = run_cache({**exp, "eval": {"seed": 0, "repeats": 4}}, "scratch", object())
    assert fewer.key(settings, 0, from_scratch=True) != key
    assert run_cache(dict(exp), "scratch", object()).key(settings, 0, from_scratch=True) == key
