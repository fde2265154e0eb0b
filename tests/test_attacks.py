"""The attacker's knobs (sophon.attacks.AttackSettings): off by default, each one changes the run, reproducibly."""

import dataclasses

import pytest
import torch
from torch import nn

import sophon.attacks
from sophon.attacks import AttackSettings, finetune
from sophon.data import DomainRequest, ImageSet, load_domain
from sophon.errors import ConfigError
from sophon.models import build_classifier
from sophon.optim import make_schedule
from sophon.train import random_shift, shift_images, train_epochs

CPU = torch.device("cpu")
BASE = dict(strategy="initFC+all", lr=0.05, batch_size=32, epochs=1)
OFF = dict(warmup_epochs=0.0, label_smoothing=0.0, clip_norm=0.0, shift=0, shift_prob=0.9, recalibrate_bn=False,
           shrink=1.0, perturb=0.0)


@pytest.fixture(scope="module")
def digits():
    data = load_domain("digits", DomainRequest(size=16))
    return data.subset(range(96)), data.subset(range(96, 156))  # 3 steps an epoch at batch 32


def run(digits, *, from_scratch=False, **knobs):
    """(curve, final weights) of one seeded fine-tune of a test_resnet."""
    torch.manual_seed(0)
    net = build_classifier("test_resnet", 10)
    curve = finetune(net, *digits, AttackSettings(**{**BASE, **knobs}), seed=3, device=CPU,
                     from_scratch=from_scratch)
    return curve, {k: v.detach().clone() for k, v in net.state_dict().items()}


def same(a, b) -> bool:
    return a[0] == b[0] and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_defaults_take_the_plain_path(digits, monkeypatch):
    def no_clipping(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called with clip_norm = 0")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clipping)
    assert AttackSettings() == AttackSettings(**{**OFF, "shift_prob": 0.5})
    assert same(run(digits), run(digits, **OFF))


@pytest.mark.parametrize("knobs", [
    dict(label_smoothing=0.2), dict(clip_norm=0.05), dict(shift=2, shift_prob=1.0), dict(shift=1, shift_prob=0.5),
    dict(shrink=0.5, perturb=0.1), dict(recalibrate_bn=True),
    dict(schedule="cosine", warmup_epochs=1.0),
], ids=lambda knobs: ",".join(knobs))
def test_each_knob_changes_the_run_reproducibly(digits, knobs):
    reference = run(digits, schedule=knobs.get("schedule", "constant"))
    first, second = run(digits, **knobs), run(digits, **knobs)
    assert same(first, second)
    assert not same(first, reference)


def test_from_scratch_takes_no_recalibration_and_shrink_perturb_as_an_init_scale(digits):
    assert same(run(digits, from_scratch=True), run(digits, from_scratch=True, recalibrate_bn=True))
    scaled = run(digits, from_scratch=True, shrink=0.5, perturb=0.1)
    assert same(scaled, run(digits, from_scratch=True, shrink=0.5, perturb=0.1))
    assert not same(scaled, run(digits, from_scratch=True))


def test_warmup_epochs_become_steps(digits, monkeypatch):
    asked = []
    real = sophon.attacks.make_schedule

    def spy(name, optimizer, total_steps, *, warmup_steps=0):
        asked.append((total_steps, warmup_steps))
        return real(name, optimizer, total_steps, warmup_steps=warmup_steps)

    monkeypatch.setattr(sophon.attacks, "make_schedule", spy)
    run(digits, schedule="cosine", epochs=2, warmup_epochs=1.5)
    run(digits, schedule="cosine", epochs=2, warmup_epochs=0.01)
    run(digits, schedule="cosine", epochs=2)
    assert asked == [(6, round(1.5 * 3)), (6, 1), (6, 0)]  # 3 steps an epoch; a tiny warm-up is one step


@pytest.mark.parametrize("warmup, peak", [(3, 3), (0, 1)])  # 0: 5 % of 20 steps = 1
def test_cosine_schedule_warms_up_over_the_steps_asked(warmup, peak):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_schedule("cosine", optimizer, 20, warmup_steps=warmup)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1 / (peak + 1))
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises linearly ...
    assert lrs[peak] == pytest.approx(1.0) and max(lrs) == lrs[peak]  # ... to the lr at step `peak`
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # then decays


def test_clip_norm_bounds_the_gradient_applied():
    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 3, (16,)),
                    ("a", "b", "c"))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    norms = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            return super().step(closure)

    def loss(net, images, labels, _):
        return 100 * nn.functional.cross_entropy(net(images.float()), labels)  # large gradients

    for clip in (0.0, 0.01):
        norms.clear()
        train_epochs(model, data, Spy(model.parameters(), lr=1e-4), epochs=2, batch_size=4,
                     generator=torch.Generator().manual_seed(0), loss=loss, clip_norm=clip)
        assert len(norms) == 8
        if clip:
            assert max(norms) <= clip * (1 + 1e-4)
        else:
            assert min(norms) > 0.01


def test_shift_moves_images_reproducibly():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).view(2, 1, 8, 8)
    a = shift_images(images, torch.Generator().manual_seed(0), 2)
    b = shift_images(images, torch.Generator().manual_seed(0), 2)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == images.shape
    assert not torch.equal(a, images)
    never = random_shift(2, 0.0)
    assert never(images, torch.Generator().manual_seed(0)) is images


def test_diffusion_rejects_label_smoothing(digits):
    from sophon.diffusion import DiffusionObjective

    with pytest.raises(ConfigError, match="label_smoothing"):
        finetune(build_classifier("test_resnet", 10), *digits, AttackSettings(label_smoothing=0.1), seed=0,
                 device=CPU, objective=DiffusionObjective(eval_repeats=1))


@pytest.mark.parametrize("key, value", [("warmup_epochs", -1.0), ("label_smoothing", 1.5), ("clip_norm", -0.1),
                                        ("shift", -1), ("shift", 1.5), ("shift_prob", 2.0), ("shrink", -0.5),
                                        ("perturb", -0.1)])
def test_bad_values_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        AttackSettings(**{key: value})
    assert {f.name for f in dataclasses.fields(AttackSettings)} >= set(OFF)


def test_scoring_in_chunks_counts_what_one_batch_counts():
    """Every attack epoch ends with a score; it runs in chunks of SCORE_BATCH (faster on CPU), with a short last
    chunk here, and must count exactly what one batch counts: the same logits' argmax against the labels."""
    from sophon.train import SCORE_BATCH, evaluate_accuracy, to_input

    data = load_domain("digits", DomainRequest(size=16))
    torch.manual_seed(0)
    net = build_classifier("test_resnet", 10)
    train_epochs(net, data.subset(range(300, 396)), torch.optim.SGD(net.parameters(), lr=0.05), epochs=1,
                 batch_size=32, generator=torch.Generator().manual_seed(0))  # BN statistics off their init
    net.eval()
    pool = data.subset([*range(300), *range(396, 900)])
    with torch.no_grad():
        top2 = net(to_input(pool.images, CPU)).topk(2, -1).values
    # Only images whose top two logits are clearly apart: a CPU that rounds a batch's sums otherwise cannot flip them.
    clear = ((top2[:, 0] - top2[:, 1]) > 1e-3).nonzero().flatten()[:SCORE_BATCH + 37].tolist()
    assert len(clear) == SCORE_BATCH + 37
    test = pool.subset(clear)
    with torch.no_grad():
        predicted = net(to_input(test.images, CPU)).argmax(-1)
    expected = 100.0 * (predicted == test.labels).sum().item() / len(test)
    assert 0 < expected < 100  # a score that can differ
    assert evaluate_accuracy(net, test, CPU) == expected
    assert evaluate_accuracy(net, test, CPU, batch_size=len(test)) == expected
