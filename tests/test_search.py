"""The attack search: its design over the space, the planted best found on a toy case, the per-run cache."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch

from sophon.data import ImageSet
from sophon.objectives import ClassificationObjective
from sophon.search import (RunCache, Trial, cached_finetune, candidates, coarse_search, grid, lr_values, plan,
                           run_search)

SPACE = {"strategies": ["direct+all", "initFC+all", "lora"], "optimizers": ["adam", "momentum"],
         "lrs": {"adam": {"low": 1e-4, "high": 1e-2, "count": 3}, "momentum": {"low": 1e-3, "high": 1e-1, "count": 3}},
         "batch_sizes": [8, 32], "schedules": ["constant", "cosine"], "weight_decays": [0.0]}


def test_lr_values_are_log_spaced():
    assert lr_values({"low": 1e-4, "high": 1e-2, "count": 3}) == [1e-4, 1e-3, 1e-2]
    assert lr_values({"low": 0.01, "high": 0.1, "count": 3}) == [0.01, 0.0316, 0.1]
    assert lr_values({"low": 0.5, "high": 0.5, "count": 1}) == [0.5]


def test_grid_and_plan_give_every_stratum_its_turn():
    full = grid(SPACE, "sophon")
    assert len(full) == 3 * 2 * 3 * 2 * 2 and len(set(full)) == len(full)
    assert {t.strategy for t in grid(SPACE, "scratch")} == {"scratch"} and len(grid(SPACE, "scratch")) == 24
    # Shrink-and-perturb doubles the strategies but LoRA (it leaves a LoRA start unchanged: Trial.equivalent).
    assert len(grid({**SPACE, "preparations": ["none", "shrink_perturb"]}, "sophon")) == len(full) // 3 * (2 * 2 + 1)
    two = {**SPACE, "preparations": ["none", "recalibrate_bn", "shrink_perturb"],
           "shrink_perturb": [{"shrink": 0.5, "perturb": 0.01}, {"shrink": 0.3, "perturb": 0.05}]}
    assert {t.preparation for t in grid(two, "sophon")} == {"none", "recalibrate_bn", "shrink_perturb@0.5/0.01",
                                                            "shrink_perturb@0.3/0.05"}
    # From scratch shrink-and-perturb is an init scale; recalibrating a fresh model's statistics is not searched.
    assert {t.preparation for t in grid(two, "scratch")} == {"none", "shrink_perturb@0.5/0.01", "shrink_perturb@0.3/0.05"}
    assert len(grid(two, "scratch")) == 3 * 24
    whole = plan(SPACE, "sophon", 0)  # 0: every grid configuration, fixed in full
    assert len(whole) == 72 and {Trial(**t) for t in whole} == set(full)

    chosen = plan(SPACE, "sophon", 12)
    pairs = Counter((t["strategy"], t["optimizer"]) for t in chosen)
    assert len(chosen) == 12 and set(pairs.values()) == {2}  # every strategy × optimiser pair twice
    assert plan(SPACE, "original", 12) == chosen  # every pretrained start runs the same strata
    assert Counter(t["optimizer"] for t in plan(SPACE, "scratch", 12)) == {"adam": 6, "momentum": 6}


def _fake_run(quality):
    """A run that reports `quality(trial, epoch)` each epoch and stops when told (no torch): records each run."""
    calls = []

    def run(trial, epochs, keep_going):
        curve = [0.0]
        for epoch in range(1, epochs + 1):
            curve.append(quality(trial, epoch))
            if not keep_going(epoch, curve[-1]):
                break
        calls.append((trial, len(curve) - 1))
        return {"curve": curve}

    return run, calls


def test_successive_halving_starts_many_and_promotes_the_best():
    space = {**SPACE, "lrs": {"adam": {"low": 1e-4, "high": 1e-2, "count": 5}, "momentum": {"low": 1e-3, "high": 1e-1, "count": 5}}}
    cfg = {"space": space, "trials": 40, "coarse_epochs": 9, "coarse_seed": 0,
           "halving": {"pruner": "successive_halving", "min_epochs": 1, "reduction": 3}}
    run, calls = _fake_run(lambda t, e: 100 * t.lr * e / (e + 1))
    records = coarse_search(run, cfg, "sophon", higher=True)
    assert len(records) == 40 and Counter((r["config"]["strategy"], r["config"]["optimizer"]) for r in records).most_common(1)[0][1] <= 7
    epochs = Counter(n for _, n in calls)
    assert epochs[1] > 10 and 0 < epochs[9] < 15  # many stopped after one epoch, a few reached the top rung
    assert all(r["pruned"] == (len(r["curve"]) - 1 < 9) for r in records)
    finished = [r for r in records if not r["pruned"]]
    assert max(r["config"]["lr"] for r in finished) == max(r["config"]["lr"] for r in records)  # the best went on
    assert len({r["name"] for r in records}) == 40  # a configuration proposed again is not run again
    again, _ = _fake_run(lambda t, e: 100 * t.lr * e / (e + 1))
    assert coarse_search(again, cfg, "sophon", higher=True) == records  # seeded: the same trials, the same cuts


def test_hyperband_cuts_are_reproducible():
    cfg = {"space": SPACE, "trials": 20, "coarse_epochs": 9, "coarse_seed": 0,
           "halving": {"pruner": "hyperband", "min_epochs": 1, "reduction": 3}}
    runs = [coarse_search(_fake_run(lambda t, e: 100 * t.lr * e / (e + 1))[0], cfg, "sophon", higher=True)
            for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]  # its brackets hash the study name: a fixed one


def test_a_stratum_whose_values_are_spent_gives_no_repeats(monkeypatch):
    space = {"strategies": ["direct+all", "lora"], "optimizers": ["adam"], "lrs": {"adam": {"low": 1e-3, "high": 1e-2, "count": 2}},
             "batch_sizes": [8], "schedules": ["constant"], "weight_decays": [0.0]}
    cfg = {"space": space, "trials": 3, "coarse_epochs": 1, "coarse_seed": 0,
           "halving": {"pruner": "successive_halving", "min_epochs": 1, "reduction": 3}}
    run, calls = _fake_run(lambda t, e: t.lr)
    records = coarse_search(run, cfg, "sophon", higher=True)
    assert len(records) == len({r["name"] for r in records}) == len(calls) == 3
    # A sampler that only repeats itself (no proposals allowed): the stratum's untried configurations, in order.
    import sophon.search

    monkeypatch.setattr(sophon.search, "ATTEMPTS", 0)
    wide = {**space, "strategies": ["direct+all"], "batch_sizes": [8, 16]}
    fallback = coarse_search(_fake_run(lambda t, e: t.lr)[0], {**cfg, "trials": 3, "space": wide}, "sophon", higher=True)
    ranked = sorted(grid(wide, "sophon"), key=lambda t: sophon.search._rank(t))
    assert [r["name"] for r in fallback] == [t.name for t in ranked[:3]]


def test_candidates_hold_the_best_at_each_epoch_and_by_area():
    def record(name, curve):
        return {"name": name, "config": {"name": name}, "curve": curve, "score": sum(curve[1:]) / (len(curve) - 1)}

    fast = record("fast", [10, 80, 82, 83, 83])  # best at epoch 2 (of the runs that got there), flat after
    slow = record("slow", [10, 70, 81, 99, 100])  # best by area and at the coarse end
    cut = record("cut", [10, 85])  # pruned after one epoch but the best there
    cfg = {"coarse_epochs": 4, "candidate_epochs": [1, 2], "confirm_top": 1, "epochs": 50}
    chosen = {(r["name"], horizon): why for r, horizon, why in candidates([fast, slow, cut], cfg, True)}
    assert chosen == {("slow", 50): ["area #1"], ("cut", 4): ["epoch 1"], ("fast", 4): ["epoch 2"],
                      ("slow", 4): ["epoch 4"]}
    low = {(r["name"], h) for r, h, _ in candidates([record("a", [1, 0.5, 0.2]), record("b", [1, 0.3, 0.6])],
                                                   {**cfg, "coarse_epochs": 2, "candidate_epochs": [1]}, False)}
    assert low == {("a", 50), ("b", 2), ("a", 2)}  # MSE: lower wins; b holds 0.3 from epoch 1 on
    # Two per candidate epoch: the runner-up at each epoch joins, named as such.
    two = {(r["name"], horizon): why for r, horizon, why in candidates([fast, slow, cut], {**cfg, "candidate_top": 2},
                                                                       True)}
    assert two == {("slow", 50): ["area #1"], ("cut", 4): ["epoch 1"],
                   ("fast", 4): ["epoch 1 #2", "epoch 2", "epoch 4 #2"],
                   ("slow", 4): ["epoch 2 #2", "epoch 4"]}


def test_a_pruned_run_is_cached_and_extended_when_promoted(tmp_path):
    train, test = _toy()
    objective = ClassificationObjective(device=torch.device("cpu"))
    cache = RunCache(tmp_path, {"toy": 1})
    settings = Trial("scratch", "sgd", 0.3, 16).settings(3, 2)
    args = dict(from_scratch=True, objective=objective, adversary=train, test=test, device=torch.device("cpu"))
    stopped, cached = cached_finetune(cache, Tiny, settings, 0, keep_going=lambda e, v: e < 1, **args)
    assert not cached and len(stopped["curve"]) == 2 and not stopped["complete"]
    seen = []
    full, cached = cached_finetune(cache, Tiny, settings, 0, keep_going=lambda e, v: seen.append(e) or True, **args)
    assert not cached and full["complete"] and len(full["curve"]) == 4 and full["curve"][:2] == stopped["curve"]
    assert seen == [1, 2, 3]  # each epoch seen once: the cached one replayed, the rest computed
    again, cached = cached_finetune(cache, Tiny, settings, 0, keep_going=lambda e, v: e < 2, **args)
    assert cached and again["curve"] == full["curve"][:3] and not again["complete"]  # a cut inside the cached part


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
           "candidate_epochs": [1], "halving": {"pruner": "successive_halving", "min_epochs": 1, "reduction": 2},
           "seeds": [0, 1], "lora_rank": 2}
    objective = ClassificationObjective(device=torch.device("cpu"))
    cache = RunCache(tmp_path, {"toy": 1})
    seen = []
    doc = run_search(Tiny, objective, train, test, cfg, start="scratch", device=torch.device("cpu"), cache=cache,
                     on_run=seen.append)
    best = Trial("scratch", "sgd", 0.3, 16)
    # The long horizon by area; the coarse horizon as the best at epoch 1 and at the coarse end.
    assert list(doc["confirmed"]) == [f"{best.name} | 4 ep", f"{best.name} | 3 ep"]
    assert doc["confirmed"][f"{best.name} | 3 ep"]["chosen_for"] == ["epoch 1", "epoch 3"]
    confirmed = doc["confirmed"][f"{best.name} | 4 ep"]
    assert confirmed["steps_per_epoch"] == 4 and len(confirmed["curves"]) == 2 and doc["tried"] == 2
    assert all(len(c) == 5 and c[-1] == 100.0 for c in confirmed["curves"])
    slow = next(r for r in doc["coarse"] if r["config"]["lr"] == 1e-6)
    assert max(slow["curve"]) < 60.0
    assert [r["phase"] for r in seen] == ["coarse", "coarse", "confirm", "confirm", "confirm", "confirm"]
    # Only the coarse-horizon confirmation at the coarse seed is the coarse run itself, from the cache.
    assert [r["cached"] for r in seen] == [False, False, False, False, True, False]

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
    # ... but its init scale does.
    assert cache.key(replace(settings, shrink=0.3, perturb=0.05), 0, from_scratch=True) != key


def test_configurations_that_train_alike_are_tried_once():
    # AdamW without weight decay takes Adam's steps (checked on the project's optimiser builder), and
    # shrink-and-perturb leaves a LoRA start unchanged: the search treats each pair as one configuration.
    from sophon.optim import make_optimizer

    weights = {}
    for name in ("adam", "adamw"):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5))
        opt = make_optimizer(name, [w], 0.1, 0.0)
        for _ in range(3):
            opt.zero_grad()
            (w ** 3).sum().backward()
            opt.step()
        weights[name] = w.detach()
    assert torch.equal(weights["adam"], weights["adamw"])
    assert Trial("direct+all", "adamw", 1e-3, 8).equivalent == Trial("direct+all", "adam", 1e-3, 8).name
    assert Trial("direct+all", "adamw", 1e-3, 8, weight_decay=0.01).equivalent != Trial(
        "direct+all", "adam", 1e-3, 8, weight_decay=0.01).name
    lora = Trial("lora", "momentum", 1e-2, 8, preparation="shrink_perturb@0.5/0.01")
    assert lora.equivalent == Trial("lora", "momentum", 1e-2, 8).name
    assert Trial("direct+all", "momentum", 1e-2, 8, preparation="shrink_perturb@0.5/0.01").equivalent != Trial(
        "direct+all", "momentum", 1e-2, 8).name

    space = {**SPACE, "optimizers": ["adam", "adamw"], "lrs": {"adam": SPACE["lrs"]["adam"], "adamw": SPACE["lrs"]["adam"]},
             "weight_decays": [0.0, 0.01], "preparations": ["none", "shrink_perturb"]}
    full = grid(space, "sophon")
    # 3 lrs × 2 batch sizes × 2 schedules per (strategy, optimiser, wd, preparation): AdamW at wd 0 folds into
    # Adam; for LoRA shrink-and-perturb folds into none.
    per = 3 * 2 * 2
    assert len(full) == len({t.equivalent for t in full}) == per * (2 * 3 * 2 + 1 * 3 * 1)
    cfg = {"space": space, "trials": 60, "coarse_epochs": 1, "coarse_seed": 0,
           "halving": {"pruner": "successive_halving", "min_epochs": 1, "reduction": 3}}
    run, calls = _fake_run(lambda t, e: t.lr)
    records = coarse_search(run, cfg, "sophon", higher=True)
    assert len(records) == len(calls) == 60
    assert len({Trial(**r["config"]).equivalent for r in records}) == 60  # no configuration ran twice in effect


def test_trial_settings_read_the_shrink_perturb_label():
    settings = Trial("initFC+all", "adamw", 1e-3, 8, preparation="shrink_perturb@0.3/0.05").settings(5, 4)
    assert (settings.shrink, settings.perturb, settings.recalibrate_bn) == (0.3, 0.05, False)
    assert Trial("initFC+all", "adamw", 1e-3, 8, preparation="recalibrate_bn").settings(5, 4).recalibrate_bn
    with pytest.raises(ValueError, match="preparation 'melt'"):
        Trial("initFC+all", "adamw", 1e-3, 8, preparation="melt").settings(5, 4)


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


def test_retest_reruns_each_pick_at_its_horizon_at_the_held_out_seeds(tmp_path, monkeypatch):
    train, test = _toy()
    space = {"strategies": ["direct+all"], "optimizers": ["sgd"], "lrs": {"sgd": {"low": 1e-6, "high": 0.3, "count": 2}},
             "batch_sizes": [16], "schedules": ["constant"], "weight_decays": [0.0]}
    cfg = {"space": space, "trials": 0, "coarse_epochs": 3, "coarse_seed": 0, "confirm_top": 1, "epochs": 4,
           "candidate_epochs": [1], "halving": {"pruner": "successive_halving", "min_epochs": 1, "reduction": 2},
           "seeds": [0, 1], "lora_rank": 2, "retest_seeds": [7, 8, 9]}
    objective = ClassificationObjective(device=torch.device("cpu"))
    seen = []
    doc = run_search(Tiny, objective, train, test, cfg, start="scratch", device=torch.device("cpu"),
                     cache=RunCache(tmp_path, {"toy": 1}), on_run=seen.append)
    from sophon.envelope import envelope
    chosen = envelope({n: c["curves"] for n, c in doc["confirmed"].items()}, True, keep_best=True)["config"]
    runs = doc["retest"]["runs"]
    assert doc["retest"]["seeds"] == [7, 8, 9] and list(runs) == list(dict.fromkeys(chosen))
    for name, curves in runs.items():  # every pick at every retest seed, on its horizon's schedule up to its last pick
        horizon = doc["confirmed"][name]["horizon"]
        last = max(1, min(horizon, max(e for e, n in enumerate(chosen) if n == name)))
        assert len(curves) == 3 and all(len(c) == last + 1 for c in curves)
        for seed, curve in zip((7, 8, 9), curves):  # the exact prefix of the full run at that seed
            full, _ = cached_finetune(RunCache(tmp_path / "full", {"toy": 1}), Tiny,
                                      Trial(**doc["confirmed"][name]["config"]).settings(horizon, 2), seed,
                                      from_scratch=True, objective=objective, adversary=train, test=test,
                                      device=torch.device("cpu"))
            assert curve == full["curve"][:last + 1]
    retests = [r for r in seen if r["phase"] == "retest"]
    assert [r["seed"] for r in retests] == [7, 8, 9] * len(runs) and not any(r["cached"] for r in retests)
    # A pick whose last epoch comes before its horizon stops there; one picked beyond its horizon runs all of it.
    long, short = f"{Trial('scratch', 'sgd', 0.3, 16).name} | 4 ep", f"{Trial('scratch', 'sgd', 0.3, 16).name} | 3 ep"
    import sophon.search as search_module
    monkeypatch.setattr(search_module, "envelope", lambda *a, **k: {"config": [long, long, long, short, short]})
    planted = run_search(Tiny, objective, train, test, cfg, start="scratch", device=torch.device("cpu"),
                         cache=RunCache(tmp_path / "planted", {"toy": 1}))["retest"]["runs"]
    assert [len(c) for c in planted[long]] == [3, 3, 3] and [len(c) for c in planted[short]] == [4, 4, 4]
    # Without retest seeds the document has no retest and runs nothing more.
    plain = run_search(Tiny, objective, train, test, {**cfg, "retest_seeds": []}, start="scratch",
                       device=torch.device("cpu"), cache=RunCache(tmp_path, {"toy": 1}))
    assert "retest" not in plain and plain["confirmed"] == doc["confirmed"]
