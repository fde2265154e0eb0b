"""The fine-tuning simulation, the Sophon loop, NTL and the adversary, on tiny data."""

import math
import random

import pytest
import torch

from sophon.attacks import AttackSettings, best_lr, finetune, sweep_score
from sophon.data import DomainRequest, load_domain
from sophon.models import build_classifier, head_parameter_names
from sophon.ntl import NTLSettings, gaussian_mmd, train_ntl
from sophon.objectives import ClassificationObjective
from sophon.protect import ProtectSettings, protect
from sophon.simulate import SimulatedTask, sample_task, simulate_finetune

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    shapes = load_domain("shapes10", DomainRequest(size=16, options={"n": 120}))
    digits = load_domain("digits", DomainRequest(size=16))
    return shapes, digits.subset(range(120)), digits.subset(range(120, 180))


def model():
    torch.manual_seed(0)
    return build_classifier("test_resnet", 10)


@pytest.mark.parametrize("start", ["direct", "initFC"])
def test_simulation_leaves_the_model_untouched_and_returns_first_order_grads(tiny, start):
    _, defender, _ = tiny
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = SimulatedTask(start=start, optimizer="adam", lr=1e-3, batch_size=16)
    result = simulate_finetune(net, ClassificationObjective("ice"), task, defender.subset(range(60)),
                               defender.subset(range(60, 120)), steps=4, eval_every=2, eval_batch_size=16,
                               generator=torch.Generator().manual_seed(0))
    for name, value in net.state_dict().items():  # weights and BatchNorm statistics alike
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in net.parameters())
    head = head_parameter_names(net)
    assert (set(result.grads) & head) == (set() if start == "initFC" else head)
    assert any(g.abs().sum() > 0 for g in result.grads.values())
    assert math.isfinite(result.suppression_loss)


def test_sample_task_scales_sgd_learning_rates():
    space = {"starts": ["direct"], "optimizers": ["momentum"], "lrs": [1e-3], "batch_sizes": [8], "lr_scale": {"momentum": 10}}
    task = sample_task(space, random.Random(0))
    assert task.optimizer == "momentum" and task.lr == pytest.approx(1e-2)


def test_protect_raises_the_suppression_loss_target_and_logs(tiny):
    shapes, defender, _ = tiny
    net = model()
    before = [p.clone() for p in net.parameters()]
    settings = ProtectSettings(loops=3, inner_steps=2, eval_every=1, eval_batch_size=16, natural_steps=1,
                               natural_batch_size=16, check_every=2, rollback_tolerance=100.0,
                               task_space={"starts": ["direct"], "optimizers": ["adam"], "lrs": [1e-3], "batch_sizes": [16]})
    history = protect(net, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU)
    assert history.loop == [1, 2, 3] and len(history.checks) == 3 and history.rollbacks == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_rollback_restores_the_last_good_state(tiny, caplog):
    shapes, defender, _ = tiny
    net = model()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    # A negative tolerance makes every check count as a collapse: each one restores the start.
    settings = ProtectSettings(loops=2, inner_steps=1, eval_every=1, eval_batch_size=8, natural_steps=1,
                               natural_batch_size=8, check_every=1, rollback_tolerance=-1.0,
                               task_space={"starts": ["direct"], "optimizers": ["adam"], "lrs": [1e-3], "batch_sizes": [8]})
    with caplog.at_level("WARNING"):
        history = protect(net, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU)
    assert history.rollbacks == 2 and "rollback at loop 1" in caplog.text
    for name, value in net.state_dict().items():
        assert torch.equal(value, start[name]), name


def _force_collapse_at(monkeypatch, loops):
    """Make the checks at `loops` count as a collapse, whatever the machine's numerics give."""
    import sophon.protect

    checks = iter(range(1, 10_000))
    monkeypatch.setattr(sophon.protect, "_collapsed", lambda *args: next(checks) in loops)


def test_restore_copies_the_snapshot_so_two_rollbacks_restore_the_same_state():
    from sophon.protect import _restore, _snapshot

    weight = torch.nn.Parameter(torch.ones(3))
    net = torch.nn.ParameterList([weight])
    opts = [torch.optim.Adam([weight], lr=0.1), torch.optim.Adam([weight], lr=0.1)]
    weight.grad = torch.ones(3)
    for opt in opts:
        opt.step()
    snapshot = _snapshot(net, *opts)
    kept = [v.clone() for v in snapshot[1][1]["state"][0].values()]
    for _ in range(2):
        _restore(net, *opts, snapshot)
        weight.grad = torch.full((3,), 5.0)
        opts[1].step()  # an in-place step after the rollback must not reach the snapshot
        assert all(torch.equal(a, b) for a, b in zip(snapshot[1][1]["state"][0].values(), kept))
        assert all(not opts[1].state[weight][k].data_ptr() == v.data_ptr() for k, v in snapshot[1][1]["state"][0].items()
                   if torch.is_tensor(v) and v.dim() > 0)


def test_forced_rollback_then_save_then_resume_matches_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    shapes, defender, _ = tiny
    settings = ProtectSettings(loops=5, inner_steps=2, eval_every=1, eval_batch_size=16, natural_steps=1,
                               natural_batch_size=16, check_every=1, rollback_tolerance=100.0, save_every=1,
                               task_space={"starts": ["direct"], "optimizers": ["adam"], "lrs": [1e-3], "batch_sizes": [16]})
    _force_collapse_at(monkeypatch, {2, 3})  # two rollbacks in a row, then states saved after them
    uninterrupted = model()
    history = protect(uninterrupted, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0,
                      device=CPU, state_dir=tmp_path, state_key="k")
    assert history.rollbacks == 2 and [c["rolled_back"] for c in history.checks[1:]] == [False, True, True, False, False]
    from sophon.io import read_state

    assert read_state(tmp_path)["loop"] == 4  # the state saved after the rollbacks is readable
    _force_collapse_at(monkeypatch, set())
    resumed = model()
    history = protect(resumed, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU,
                      state_dir=tmp_path, state_key="k")  # picks up after loop 4 and runs loop 5
    assert history.rollbacks == 2 and history.loop == [1, 2, 3, 4, 5]
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("strategy", ["direct+all", "initFC+all", "initFC+FC"])
def test_finetune_strategies(tiny, strategy):
    _, adversary, test = tiny
    net = model()
    backbone = {k: v.clone() for k, v in net.named_parameters() if not k.startswith("net.fc")}
    curve = finetune(net, adversary, test, AttackSettings(strategy=strategy, lr=0.05, batch_size=32, epochs=2),
                     seed=0, device=CPU)
    assert len(curve) == 3 and all(0 <= a <= 100 for a in curve)
    unchanged = all(torch.equal(v, dict(net.named_parameters())[k]) for k, v in backbone.items())
    assert unchanged == (strategy == "initFC+FC")


def test_finetune_is_reproducible_for_a_seed(tiny):
    _, adversary, test = tiny
    settings = AttackSettings(strategy="initFC+all", lr=0.05, batch_size=32, epochs=1)
    assert finetune(model(), adversary, test, settings, seed=3, device=CPU) == \
        finetune(model(), adversary, test, settings, seed=3, device=CPU)


def test_best_lr_prefers_fast_and_high_curves():
    curves = {0.001: [10, 11, 12, 13], 0.01: [10, 40, 60, 70], 0.1: [10, 10, 10, 80]}
    assert sweep_score(curves[0.01]) == pytest.approx(170 / 3)
    assert best_lr(curves) == 0.01


def test_ntl_runs_and_mmd_is_zero_for_identical_batches(tiny):
    shapes, defender, _ = tiny
    x = torch.randn(8, 4)
    assert gaussian_mmd(x, x).abs() < 1e-6 and gaussian_mmd(x, x + 3) > 0.1
    history = train_ntl(model(), shapes, defender, NTLSettings(steps=3, batch_size=16), seed=0, device=CPU)
    assert len(history.loss) == 3 and all(math.isfinite(v) for v in history.loss)
