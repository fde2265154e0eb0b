"""Several simulated adversaries at once (sophon.simulate.AdversaryBatch): the same adapted weights, batch-norm
statistics, suppression losses and first-order gradients as running them one at a time on the same batches.

The equality tests over several inner steps run in float64. In float32 the two paths differ only in summation order,
but the inner fine-tune turns rounding into visible differences within a few steps (measured on this data: the
one-at-a-time path against itself at 1 and 2 threads differs by 6 % in gradient norm after one Adam step, and by 60 %
after four SGD-momentum steps at lr 1e-2), so float64 is where "the same computation" can be checked to 1e-5; float32
is checked at the first evaluation point (before any inner step)."""

import pytest
import torch

from sophon.data import DomainRequest, load_domain
from sophon.fold import fold_model, fold_plan, fold_tensors, foldable
from sophon.models import build_classifier
from sophon.objectives import ClassificationObjective
from sophon.protect import ProtectSettings, protect, variant_name
from sophon.simulate import (Adversary, AdversaryBatch, SimulatedTask, batch_key, group_adversaries,
                             run_adversaries)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_domain("digits", DomainRequest(size=16)).subset(range(120))


def model(dtype=torch.float64):
    torch.manual_seed(0)
    return build_classifier("test_resnet", 10).to(dtype)


def adversaries(net, digits, tasks, objective=None, depth=None, total_steps=8):
    generator = torch.Generator().manual_seed(0)
    objective = objective or ClassificationObjective("ice")
    return [Adversary(net, objective, task, digits.subset(range(60)), digits.subset(range(60, 120)),
                      total_steps=total_steps, eval_batch_size=16, generator=generator, depth=depth)
            for task in tasks]


def close(a, b, rtol):
    """Relative difference in norm (a tensor's elements near zero carry no weight of their own)."""
    a, b = a.double(), b.double()
    return (a - b).norm() <= rtol * a.norm() + 1e-12


@pytest.mark.parametrize("optimizer,engine,suppression", [("adam", "fold", "ice"), ("momentum", "fold", "ice"),
                                                         ("adam", "vmap", "ice"), ("adam", "vmap", "ice_balanced")])
def test_batched_adversaries_equal_one_at_a_time(digits, optimizer, engine, suppression, rtol=1e-5):
    net = model()
    objective = ClassificationObjective(suppression)
    lr = {"adam": 1e-3, "momentum": 1e-2}[optimizer]
    # direct+all and initFC+all train the same tensors: one batch, the head's start and targets per adversary.
    tasks = [SimulatedTask("direct", optimizer, lr, 16, seed=1), SimulatedTask("initFC", optimizer, lr, 16, seed=2),
             SimulatedTask("initFC+all", optimizer, lr, 16, schedule="constant", seed=3)]
    alone = adversaries(net, digits, tasks, objective)
    runners = group_adversaries(adversaries(net, digits, tasks, objective))
    assert len(runners) == 1 and isinstance(runners[0], AdversaryBatch)
    batch = (runners[0] if engine == "fold"
             else AdversaryBatch(adversaries(net, digits, tasks, objective), engine="vmap"))
    for loop in range(2):  # two runs of persistent adversaries: the second follows a change of the released weights
        # The same batches for both, drawn once: the comparison does not rest on the generators agreeing.
        drawn = [a.draw(4, 2) for a in alone]
        expected = [a.run(4, 2, "exponential", 4.0, d) for a, d in zip(alone, drawn)]
        got = batch.run(4, 2, "exponential", 4.0, drawn)
        for k, (a, e, g) in enumerate(zip(alone, expected, got)):
            assert e.grads.keys() == g.grads.keys() == set(a.targets)
            for name in e.grads:
                assert close(e.grads[name], g.grads[name], rtol), (loop, k, name)
            assert g.suppression_loss == pytest.approx(e.suppression_loss, rel=rtol)
            assert g.final_suppression_loss == pytest.approx(e.final_suppression_loss, rel=rtol)
            for name, value in a.params.items():
                assert close(value, batch.params[name][k], rtol), (loop, k, name)
            for name, value in a.buffers.items():  # batch-norm running statistics (and batches tracked)
                assert close(value, batch.buffers[name][k], rtol), (loop, k, name)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1e-2 * torch.randn_like(p))
    head = {"net.fc.weight", "net.fc.bias"}
    assert head <= set(got[0].grads) and not head & set(got[1].grads)  # initFC's fresh head gets no gradient


def test_batched_first_evaluation_point_in_float32(digits, rtol=1e-5):
    net = model(torch.float32)
    tasks = [SimulatedTask("direct", "adam", 1e-3, 16, seed=1), SimulatedTask("initFC", "adam", 1e-3, 16, seed=2)]
    alone = adversaries(net, digits, tasks)
    drawn = [a.draw(0, 1) for a in alone]
    expected = [a.run(0, 1, drawn=d) for a, d in zip(alone, drawn)]
    batch = AdversaryBatch(adversaries(net, digits, tasks))
    for k, (a, e, g) in enumerate(zip(alone, expected, batch.run(0, 1, drawn=drawn))):
        assert g.suppression_loss == pytest.approx(e.suppression_loss, rel=rtol)
        for name in e.grads:
            assert close(e.grads[name], g.grads[name], rtol), (k, name)
        for name, value in a.buffers.items():
            assert close(value, batch.buffers[name][k], rtol), (k, name)


def test_run_adversaries_draws_the_batches_the_one_at_a_time_path_draws(digits):
    """In protect the batched path draws from the shared generator in the one-at-a-time order: same batches, so the
    same results, without forcing them (float64)."""
    net = model()
    tasks = [SimulatedTask("direct", "momentum", 3e-2, 16, seed=1), SimulatedTask("direct", "adam", 1e-3, 32, seed=2),
             SimulatedTask("initFC", "momentum", 3e-2, 16, seed=3)]
    runners = group_adversaries(adversaries(net, digits, tasks))
    assert [type(r).__name__ for r in runners] == ["AdversaryBatch", "Adversary"]
    got = run_adversaries(runners, 3, 1)
    expected = run_adversaries(group_adversaries(adversaries(net, digits, tasks), batched=False), 3, 1)
    for e, g in zip(expected, got):
        assert g.suppression_loss == pytest.approx(e.suppression_loss, rel=1e-9)
        for name in e.grads:
            assert close(e.grads[name], g.grads[name], 1e-8), name


def test_groups_that_do_not_qualify_run_one_at_a_time(digits):
    net = model(torch.float32)
    base = SimulatedTask("direct", "adam", 1e-3, 16, seed=1)
    differ = [SimulatedTask("direct", "adam", 3e-3, 16), SimulatedTask("direct", "momentum", 1e-3, 16),
              SimulatedTask("direct", "adam", 1e-3, 32), SimulatedTask("direct", "adam", 1e-3, 16, "cosine"),
              SimulatedTask("initFC+FC", "adam", 1e-3, 16)]  # lr, optimiser, batch, schedule, trained tensors
    runners = group_adversaries(adversaries(net, digits, [base, *differ]))
    assert all(isinstance(r, Adversary) for r in runners) and len(runners) == 6
    twins = [base, SimulatedTask("direct", "adam", 1e-3, 16, seed=2)]
    assert all(isinstance(r, Adversary) for r in group_adversaries(adversaries(net, digits, twins), batched=False))
    assert all(isinstance(r, Adversary) for r in group_adversaries(adversaries(net, digits, twins[:1])))

    class Drawing(ClassificationObjective):  # e.g. diffusion: its losses draw noise from the generator
        losses_draw = True

    drawing = adversaries(net, digits, twins, objective=Drawing("ice"))
    assert batch_key(drawing[0]) is None
    assert all(isinstance(r, Adversary) for r in group_adversaries(drawing))
    with_depth = adversaries(net, digits, twins, depth=object())  # a depth term at the adapted weights
    assert all(isinstance(r, Adversary) for r in group_adversaries(with_depth))
    with pytest.raises(ValueError):
        AdversaryBatch(adversaries(net, digits, [base, differ[0]]))


def test_protect_batched_equals_one_at_a_time_and_keeps_the_variant_name(digits, monkeypatch):
    shapes = load_domain("shapes10", DomainRequest(size=16, options={"n": 120}))
    space = {"starts": ["direct", "initFC"], "optimizers": ["momentum"], "lrs": [1e-3], "batch_sizes": [16],
             "lr_scale": {"momentum": 10.0}}
    settings = dict(loops=2, tasks_per_loop=3, inner_steps=2, eval_every=1, eval_batch_size=16, natural_steps=1,
                    natural_batch_size=16, check_every=2, persist_loops=2, task_space=space)
    calls = []
    run = AdversaryBatch.run
    monkeypatch.setattr(AdversaryBatch, "run", lambda self, *a, **k: calls.append(len(self.adversaries)) or run(
        self, *a, **k))
    nets, histories = [], []
    for batched in (True, False):
        net = model()
        histories.append(protect(net, ClassificationObjective("ice"), digits, shapes, shapes.subset(range(60)),
                                 ProtectSettings(**settings, batched=batched), seed=0, device=CPU))
        nets.append(net)
    assert calls == [3, 3]  # one batch of three adversaries, kept for both loops
    assert histories[0].suppression_loss == pytest.approx(histories[1].suppression_loss, rel=1e-9)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert close(b, a, 1e-8), name
    assert variant_name(ProtectSettings(batched=False)) == variant_name(ProtectSettings()) == "paper"


def test_the_fold_computes_each_copy_and_refuses_what_mixes_channels():
    net = model(torch.float32).train()
    assert foldable(net)
    stacked = {n: torch.stack([p.detach() + 0.01 * k for k in range(3)]) for n, p in net.named_parameters()}
    buffers = {n: torch.stack([b.clone() for _ in range(3)]) for n, b in net.named_buffers()}
    before = {n: b.clone() for n, b in buffers.items()}
    x = torch.rand(3, 4, 3, 16, 16)
    folded = fold_model(net, 3)
    out = torch.func.functional_call(folded, fold_tensors({**stacked, **buffers}, fold_plan(net)),
                                     (torch.cat(list(x), dim=1),)).view(4, 3, -1)
    for k in range(3):
        own_buffers = {n: b[k].clone() for n, b in before.items()}
        own = torch.func.functional_call(net, ({n: p[k] for n, p in stacked.items()}, own_buffers), (x[k],))
        torch.testing.assert_close(out[:, k], own, rtol=1e-4, atol=1e-5)
        for n, b in own_buffers.items():
            if b.dim():  # running statistics, each copy its own
                torch.testing.assert_close(buffers[n][k], b, rtol=1e-4, atol=1e-6)
    assert not foldable(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm([4, 14, 14])))
    assert not foldable(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=None)))


def test_a_forward_that_mixes_channels_is_caught(digits):
    class Mixing(torch.nn.Module):  # foldable layers, but its own code mixes channels
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x):
            x = self.conv(x)
            return self.fc(x.mean((2, 3)) - x.mean((1, 2, 3))[:, None])

    tasks = [SimulatedTask("direct", "adam", 1e-3, 16, seed=1), SimulatedTask("direct", "adam", 1e-3, 16, seed=2)]
    runners = group_adversaries(adversaries(Mixing(), digits, tasks))
    assert isinstance(runners[0], AdversaryBatch)
    with pytest.raises(RuntimeError, match="batched: false"):
        runners[0].run(1, 1)
