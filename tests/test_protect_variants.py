"""What the protect stage adds beyond the paper: simulated starts that re-initialise more than the head, inner-step
weighting, the probe-selected checkpoint, diffusion suppression on a timestep range, and the variant's name."""

import copy
import math
from dataclasses import replace

import pytest
import torch
import yaml

from sophon.config import load_params
from sophon.data import ImageSet
from sophon.errors import ConfigError
from sophon.models import build_classifier, head_parameter_names
from sophon.objectives import ClassificationObjective
from sophon.protect import Probe, ProtectSettings, anneal_factor, protect, variant_name
from sophon.io import read_state
from sophon.simulate import (Adversary, SimulatedTask, eval_points, sample_task, simulate_finetune, simulated_start,
                             step_weights)
from sophon.strategies import model_stages, prepare

CPU = torch.device("cpu")


def model():
    torch.manual_seed(0)
    return build_classifier("test_resnet", 10)


# --- simulated starts --------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["reinit1+all", "reinit2+all", "reinit3+all", "initFC+FC", "initFC"])
def test_simulated_start_reinitialises_what_the_attack_strategy_does(strategy):
    net = model()
    fresh, reinitialised, trained, shrunk = simulated_start(net, strategy, seed=5)
    # The same names as the attack's own preparation of a copy, and the model itself untouched.
    expected = prepare(copy.deepcopy(net), {"initFC": "initFC+all"}.get(strategy, strategy), seed=5)
    assert reinitialised == set(expected.reinitialised) == set(fresh)
    head = head_parameter_names(net)
    assert head <= reinitialised
    if strategy.startswith("reinit"):
        k = int(strategy[len("reinit")])
        stages = model_stages(net)
        for stage in stages[-k:]:
            assert any(name.startswith(f"{stage}.") for name in reinitialised), stage
        assert not any(name.startswith(f"{stages[-k - 1]}.") for name in reinitialised)
    params, prepared = dict(net.named_parameters()), dict(expected.model.named_parameters())
    for name, value in fresh.items():
        assert torch.equal(value, prepared[name]), name  # the same fresh values for the same seed
        assert value.dim() == 1 or not torch.equal(value, params[name]), name
    assert trained == (head if strategy == "initFC+FC" else set(params)) and shrunk == set()


@pytest.mark.parametrize("strategy", ["reinit1+all", "initFC+FC"])
def test_simulation_gives_no_gradient_to_fresh_tensors_and_keeps_the_model(tiny, strategy):
    _, defender = tiny
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = SimulatedTask(start=strategy, optimizer="adam", lr=1e-3, batch_size=16, schedule="cosine", seed=1)
    result = simulate_finetune(net, ClassificationObjective("klu"), task, defender.subset(range(60)),
                               defender.subset(range(60, 120)), steps=3, eval_every=1, eval_batch_size=16,
                               generator=torch.Generator().manual_seed(0))
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    _, reinitialised, _, _ = simulated_start(net, strategy, seed=1)
    assert set(result.grads) == {n for n, _ in net.named_parameters()} - reinitialised
    assert any(g.abs().sum() > 0 for name, g in result.grads.items() if name.startswith("net.layer1."))


def lora_adversary(net, defender, start="lora", seed=0):
    task = SimulatedTask(start=start, optimizer="adam", lr=1e-2, batch_size=16, seed=3, lora_rank=2)
    return Adversary(net, ClassificationObjective("ice"), task, defender.subset(range(60)),
                     defender.subset(range(60, 120)), total_steps=4, eval_batch_size=16,
                     generator=torch.Generator().manual_seed(seed))


def test_a_lora_adversary_trains_only_its_adapters_and_its_gradient_is_at_the_base_weights(tiny):
    from peft.tuners.lora import LoraLayer

    _, defender = tiny
    net = model()
    with torch.no_grad():  # timm zero-initialises each block's last batch norm: open every residual branch
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adversary = lora_adversary(net, defender)
    assert any(isinstance(m, LoraLayer) for m in adversary.module.modules())
    assert not any(isinstance(m, LoraLayer) for m in net.modules())
    adapters = {n: v.clone() for n, v in adversary.params.items() if n in adversary.trained}
    assert adapters and all("lora_" in n for n in adapters)
    bases = {n: v.clone() for n, v in adversary.params.items() if n not in adversary.trained}
    result = adversary.run(4, 2)
    # Every released weight gets a first-order gradient (none is replaced), under the model's own names.
    assert set(result.grads) == {n for n, _ in net.named_parameters()}
    for name, value in bases.items():
        assert torch.equal(adversary.params[name], value), name  # the base weights stay the released ones
    moved = [n for n in adapters if not torch.equal(adversary.params[n], adapters[n])]
    assert len(moved) == len(adapters), sorted(set(adapters) - set(moved))  # every adapter trained
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_lora_adversary_before_any_step_is_the_released_model(tiny):
    # lora_B starts at zero, so W + BA = W: the suppression gradient at step 0 is the direct adversary's.
    _, defender = tiny
    net = model()
    lora = lora_adversary(net, defender).run(0, 1)
    direct = lora_adversary(net, defender, start="direct").run(0, 1)
    assert set(lora.grads) == set(direct.grads)
    for name in direct.grads:
        assert torch.allclose(lora.grads[name], direct.grads[name], rtol=1e-5, atol=1e-7), name
    assert lora.suppression_loss == pytest.approx(direct.suppression_loss, rel=1e-6)


# --- shrink-and-perturb adversaries ---------------------------------------------------------------------------

def sp_adversary(net, defender, start="initFC+all", shrink=0.3, perturb=0.05):
    task = SimulatedTask(start=start, optimizer="adam", lr=1e-2, batch_size=16, seed=3, shrink=shrink, perturb=perturb)
    return Adversary(net, ClassificationObjective("ice"), task, defender.subset(range(60)),
                     defender.subset(range(60, 120)), total_steps=4, eval_batch_size=16,
                     generator=torch.Generator().manual_seed(0))


def test_a_shrink_perturb_start_is_the_attacks_own_preparation():
    from sophon.strategies import shrink_perturb, shrinkable

    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    start, reinitialised, trained, shrunk = simulated_start(net, "initFC+all", seed=5, shrink=0.3, perturb=0.05)
    expected = prepare(copy.deepcopy(net), "initFC+all", seed=5)
    changed = shrink_perturb(expected.model, shrinkable(expected), 0.3, 0.05, seed=5)  # what the attack runs
    assert shrunk == set(changed) == set(trained) - reinitialised and reinitialised == set(expected.reinitialised)
    attacked = dict(expected.model.named_parameters())
    assert set(start) == shrunk | reinitialised
    for name, value in start.items():
        assert torch.equal(value, attacked[name]), name
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name  # the model untouched


def test_a_shrunk_adversarys_gradient_is_the_chain_rule_through_its_start(tiny):
    # Before any step the adapted weights are shrink·θ + perturb·θ_fresh: the first-order gradient at θ is
    # shrink times the suppression gradient there (closed form by autograd through the start itself).
    from torch.func import functional_call

    _, defender = tiny
    net = model()
    adversary = sp_adversary(net, defender)
    eval_images, _ = adversary.draw(0, 1)
    images, labels = eval_images[0]
    result = adversary.run(0, 1, drawn=([(images, labels)], []))
    start, reinitialised, _, shrunk = simulated_start(net, "initFC+all", seed=3, shrink=0.3, perturb=0.05)
    released = {n: p.detach().clone().requires_grad_(n not in reinitialised) for n, p in net.named_parameters()}
    fresh = {n: (start[n] - 0.3 * released[n].detach()) / 0.05 for n in shrunk}  # θ_fresh of the same seed
    adapted = {n: (0.3 * released[n] + 0.05 * fresh[n] if n in shrunk else start[n] if n in reinitialised
                   else released[n]) for n in released}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    loss = ClassificationObjective("ice").suppression_loss(
        lambda *args: functional_call(net, (adapted, buffers), args), images, labels, torch.Generator())
    targets = [n for n in released if n not in reinitialised]
    expected = dict(zip(targets, torch.autograd.grad(loss, [released[n] for n in targets])))
    assert set(result.grads) == set(targets) and shrunk
    for name in targets:
        assert torch.allclose(result.grads[name], expected[name], rtol=1e-4, atol=1e-6), name


def test_a_shrunk_adversary_follows_the_release_by_shrink_times_its_change(tiny):
    _, defender = tiny
    net = model()
    adversary = sp_adversary(net, defender)
    adversary.run(0, 1)
    name = "net.layer1.0.conv1.weight"
    assert adversary.scale[name] == 0.3
    before = adversary.params[name].detach().clone()
    with torch.no_grad():
        dict(net.named_parameters())[name].add_(1.0)
    adversary.follow()
    assert torch.allclose(adversary.params[name].detach() - before, torch.full_like(before, 0.3))


def test_sample_task_draws_shrink_perturb_only_when_asked():
    import random

    space = {"starts": ["initFC"], "optimizers": ["adam"], "lrs": [1e-3], "batch_sizes": [16]}
    plain = [sample_task(space, random.Random(i)) for i in range(40)]
    assert all((t.shrink, t.perturb) == (1.0, 0.0) for t in plain)
    drawn = [sample_task({**space, "shrink_perturb": [{"shrink": 0.3, "perturb": 0.05}]}, random.Random(i))
             for i in range(40)]
    assert {(t.shrink, t.perturb) for t in drawn} == {(1.0, 0.0), (0.3, 0.05)}
    # The draw comes last: everything else is what the plain space draws.
    assert [replace(t, shrink=1.0, perturb=0.0) for t in drawn] == plain


# --- inner-step weighting -----------------------------------------------------------------------------------

def test_step_weights_are_geometric_and_sum_to_one():
    uniform = step_weights(4)
    assert uniform == pytest.approx([0.25] * 4)
    weights = step_weights(5, "exponential", 16.0)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[-1] / weights[0] == pytest.approx(16.0)
    ratios = [b / a for a, b in zip(weights, weights[1:])]
    assert ratios == pytest.approx([2.0] * 4)  # 16^(1/4)
    assert step_weights(1, "exponential", 16.0) == [1.0]
    with pytest.raises(ConfigError, match="weighting 'linear'"):
        step_weights(3, "linear")
    assert eval_points(10, 4) == [0, 4, 8, 10] and eval_points(4, 1) == [0, 1, 2, 3, 4]


class _Drift(torch.nn.Module):
    """One parameter vector w; the forward pass returns it whatever the input."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([3.0, -1.0], dtype=torch.float64))

    def forward(self, images):
        return self.w


class _Quadratic:
    """Fine-tuning loss Σw (SGD moves every entry by −lr per step); suppression ½‖w‖² (gradient w)."""

    higher_is_better = True

    def finetune_loss(self, forward, images, labels, generator):
        return forward(images).sum()

    def suppression_loss(self, forward, images, labels, generator):
        return 0.5 * forward(images).pow(2).sum()


@pytest.mark.parametrize("weighting,late", [("uniform", 1.0), ("exponential", 8.0)])
def test_inner_step_weighting_matches_the_closed_form(weighting, late):
    """After k SGD steps w_k = w_0 − k·lr, so the collected gradient is Σ_j weight_j · w_{k_j} over the points."""
    data = ImageSet(torch.zeros(8, 1, 2, 2, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64), ("x",))
    net, lr, steps, every = _Drift(), 0.1, 6, 2
    task = SimulatedTask(start="direct", optimizer="sgd", lr=lr, batch_size=4)
    result = simulate_finetune(net, _Quadratic(), task, data, data, steps=steps, eval_every=every, eval_batch_size=4,
                               generator=torch.Generator().manual_seed(0), weighting=weighting, late_weight=late)
    points = eval_points(steps, every)
    weights = step_weights(len(points), weighting, late)
    w0 = net.w.detach()
    expected = sum(wt * (w0 - k * lr) for wt, k in zip(weights, points))
    torch.testing.assert_close(result.grads["w"], expected)
    expected_loss = sum(wt * 0.5 * (w0 - k * lr).pow(2).sum().item() for wt, k in zip(weights, points))
    assert result.suppression_loss == pytest.approx(expected_loss)
    assert result.final_suppression_loss == pytest.approx(0.5 * (w0 - steps * lr).pow(2).sum().item())


# --- persistent adversaries --------------------------------------------------------------------------------

def _adversary(net, defender, start="direct"):
    task = SimulatedTask(start=start, optimizer="adam", lr=1e-2, batch_size=16, schedule="cosine", seed=3)
    return Adversary(net, ClassificationObjective("ice"), task, defender.subset(range(60)),
                     defender.subset(range(60, 120)), total_steps=6, eval_batch_size=16,
                     generator=torch.Generator().manual_seed(0))


def test_a_persistent_adversary_fine_tunes_on_where_it_stopped(tiny):
    _, defender = tiny
    net = model()
    twice, once = _adversary(net, defender), _adversary(net, defender)
    twice.run(3, eval_every=3)
    twice.run(3, eval_every=3)
    once.run(6, eval_every=3)  # the same evaluation points, so the same batches from the shared generator
    for name, value in once.params.items():
        assert torch.equal(twice.params[name], value), name
    assert twice.optimizer.param_groups[0]["lr"] == once.optimizer.param_groups[0]["lr"]  # one cosine, 6 steps


def test_a_persistent_adversary_follows_the_released_weights_except_what_it_replaced(tiny):
    _, defender = tiny
    net = model()
    adversary = _adversary(net, defender, start="initFC")
    adversary.run(2, eval_every=2)
    before = {name: p.detach().clone() for name, p in adversary.params.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5)
    adversary.follow()
    head = head_parameter_names(net)
    for name, value in adversary.params.items():
        moved = value - before[name]
        if name in head:  # re-initialised by the adversary: the release's change does not reach it
            assert torch.equal(moved, torch.zeros_like(moved)), name
        else:
            assert torch.allclose(moved, torch.full_like(moved, 0.5)), name
    adversary.follow()  # nothing changed since
    assert all(torch.allclose(adversary.params[n], before[n] + (0 if n in head else 0.5)) for n in before)


def _resumed(tiny, tmp_path, settings):
    """Protect to the end, saving states, then again from the last state saved: (that state, the resumed run's
    history, its model), once both runs are seen to end at the same weights."""
    shapes, defender = tiny
    uninterrupted = model()
    protect(uninterrupted, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU,
            state_dir=tmp_path, state_key="k")
    saved = read_state(tmp_path)
    resumed = model()
    history = protect(resumed, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0,
                      device=CPU, state_dir=tmp_path, state_key="k")
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    return saved, history, resumed


def test_protect_with_persistent_adversaries_saves_only_between_them_and_resumes_exactly(tiny, tmp_path):
    shapes, defender = tiny
    saved, _, resumed = _resumed(tiny, tmp_path, _settings(loops=5, persist_loops=2, save_every=1))
    assert saved["loop"] == 4  # loops 1 and 3 end inside an adversary's life: no state there; the resume runs loop 5
    fresh = model()  # a fresh adversary every loop is another run
    protect(fresh, ClassificationObjective("ice"), defender, shapes, shapes, _settings(loops=5), seed=0, device=CPU)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), resumed.state_dict().values()))


# --- checkpoint selection -----------------------------------------------------------------------------------

def _settings(**changes):
    return ProtectSettings(**{**dict(loops=4, inner_steps=2, eval_every=1, eval_batch_size=16, natural_steps=1,
                                     natural_batch_size=16, check_every=1, rollback_tolerance=100.0,
                                     task_space={"starts": ["direct"], "optimizers": ["adam"], "lrs": [1e-2],
                                                 "batch_sizes": [16]},
                                     probe={"strategy": "initFC+all", "optimizer": "adam", "lr": 1e-3,
                                            "batch_size": 30, "epochs": 1}), **changes})


def test_probe_selection_releases_the_check_the_probe_found_hardest(tiny):
    shapes, defender = tiny
    net = model()
    history = protect(net, ClassificationObjective("ice"), defender, shapes, shapes, _settings(select="probe"),
                      seed=0, device=CPU)
    assert [p["loop"] for p in history.probes] == [1, 2, 3, 4]
    scores = [p["score"] for p in history.probes]
    assert history.selected_loop == history.probes[scores.index(min(scores))]["loop"]
    # The released weights are exactly those of an unselected run stopped at the selected loop.
    same = model()
    protect(same, ClassificationObjective("ice"), defender, shapes, shapes,
            _settings(select="last", loops=history.selected_loop), seed=0, device=CPU)
    for (name, a), b in zip(net.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), name
    # The probe's score of the released weights is the selected one.
    probe = Probe(_settings().probe, ClassificationObjective("ice"), defender, seed=0, device=CPU)
    assert probe(net) == pytest.approx(min(scores))


def test_alpha_zero_simulates_the_adversaries_but_suppresses_nothing(tiny):
    shapes, defender = tiny
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    history = protect(net, ClassificationObjective("ice"), defender, shapes, shapes,
                      _settings(alpha=0.0, natural_steps=0, loops=2), seed=0, device=CPU)
    assert len(history.suppression_loss) == 2 and all(0 < loss < 100 for loss in history.suppression_loss)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name  # nothing but reinforcement steps (none here) changes it
    # With a suppression step the same run moves the weights.
    moved = model()
    protect(moved, ClassificationObjective("ice"), defender, shapes, shapes, _settings(natural_steps=0, loops=2),
            seed=0, device=CPU)
    assert any(not torch.equal(a, before[k]) for k, a in moved.state_dict().items())


def test_last_selection_releases_the_last_loop(tiny):
    shapes, defender = tiny
    history = protect(model(), ClassificationObjective("ice"), defender, shapes, shapes, _settings(loops=2),
                      seed=0, device=CPU)
    assert history.selected_loop == 2 and history.probes == []


def test_average_from_releases_the_mean_of_the_checks_with_batch_norm_statistics_recomputed(tiny):
    shapes, defender = tiny
    settings = _settings(average_from=3)
    net = model()
    history = protect(net, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU)
    assert history.averaged_loops == [3, 4] and history.selected_loop is None
    # The parameters are the mean of those of the same run stopped at loops 3 and 4.
    stopped = {}
    for loops in (3, 4):
        stopped[loops] = model()
        protect(stopped[loops], ClassificationObjective("ice"), defender, shapes, shapes, _settings(loops=loops),
                seed=0, device=CPU)
    for (name, p), p3, p4 in zip(net.named_parameters(), stopped[3].parameters(), stopped[4].parameters()):
        assert torch.allclose(p, (p3 + p4) / 2, atol=1e-6), name
    # The first batch norm's running mean is the mean over the original domain's batches of its input's batch means
    # (update_bn's cumulative average); the last loop's own statistics are not kept.
    first_bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net.eval()  # its input is the same in either mode; eval keeps the statistics as released
    batch_means = []
    hook = first_bn.register_forward_pre_hook(lambda m, args: batch_means.append(args[0].mean(dim=(0, 2, 3))))
    objective = ClassificationObjective("ice")
    with torch.no_grad():
        for start in range(0, len(shapes), settings.natural_batch_size):
            net(*objective.model_inputs(shapes.images[start:start + settings.natural_batch_size], None))
    hook.remove()
    assert len(batch_means) == 8  # 120 images in batches of 16
    assert torch.allclose(first_bn.running_mean, torch.stack(batch_means).mean(0), atol=1e-5)
    last_bn = next(m for m in stopped[4].modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(first_bn.running_mean, last_bn.running_mean, atol=1e-3)


def test_average_from_resumes_exactly_and_is_checked(tiny, tmp_path):
    shapes, defender = tiny
    saved, history, _ = _resumed(tiny, tmp_path, _settings(loops=5, average_from=2, save_every=2))
    assert saved["loop"] == 4 and int(saved["averaged"]["n_averaged"]) == 3
    assert history.averaged_loops == [2, 3, 4, 5]
    with pytest.raises(ConfigError, match="sophon.average_from: 2 averages the checks, and sophon.select: probe"):
        protect(model(), ClassificationObjective("ice"), defender, shapes, shapes,
                _settings(average_from=2, select="probe"), seed=0, device=CPU)
    with pytest.raises(ConfigError, match=r"sophon.average_from: 9 is past the last loop \(sophon.loops: 4\)"):
        protect(model(), ClassificationObjective("ice"), defender, shapes, shapes, _settings(average_from=9),
                seed=0, device=CPU)
    assert variant_name(_settings(average_from=300)) == "paper + weights averaged over checks from loop 300"


def test_anneal_factor_is_one_then_a_cosine_down_to_the_floor_at_the_last_loop():
    settings = _settings(loops=10, anneal_from=6, anneal_floor=0.2)
    assert [anneal_factor(loop, settings) for loop in (1, 5, 6)] == [1.0, 1.0, 1.0]
    # loop 8 is half way from 6 to 10: cos(π/2) = 0, so the factor is the floor plus half the rest
    assert anneal_factor(8, settings) == pytest.approx(0.2 + 0.8 * 0.5)
    assert anneal_factor(7, settings) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert anneal_factor(10, settings) == pytest.approx(0.2)
    assert anneal_factor(10, _settings(loops=10)) == 1.0  # anneal_from 0: off


def test_anneal_sets_both_outer_lrs_each_loop_resumes_exactly_and_is_checked(tiny, tmp_path):
    shapes, defender = tiny
    settings = _settings(loops=6, anneal_from=2, anneal_floor=0.25, save_every=4)
    saved, _, annealed = _resumed(tiny, tmp_path, settings)
    assert saved["loop"] == 4
    # the state after loop 4 holds the lrs of loop 5: α·lr and β·lr times the factor there
    factor = anneal_factor(5, settings)
    assert 0.25 < factor < 1
    assert saved["suppress_opt"]["param_groups"][0]["lr"] == pytest.approx(settings.alpha * settings.lr * factor)
    assert saved["normal_opt"]["param_groups"][0]["lr"] == pytest.approx(settings.beta * settings.lr * factor)
    constant = model()
    protect(constant, ClassificationObjective("ice"), defender, shapes, shapes, replace(settings, anneal_from=0),
            seed=0, device=CPU)
    assert any(not torch.equal(a, b) for a, b in zip(constant.state_dict().values(), annealed.state_dict().values()))
    for changes, message in (({"anneal_from": 6}, r"sophon.anneal_from: 6 is not before the last loop"),
                             ({"anneal_floor": 0.0}, r"sophon.anneal_floor: 0.0 is not in \(0, 1\]")):
        with pytest.raises(ConfigError, match=message):
            protect(model(), ClassificationObjective("ice"), defender, shapes, shapes, replace(settings, **changes),
                    seed=0, device=CPU)
    assert variant_name(_settings(anneal_from=350)) == "paper + outer lrs annealed from loop 350 to ×0.1"


def test_anneal_sets_the_lrs_after_a_rollback_restored_the_snapshots(tiny, tmp_path):
    """A rollback restores the optimisers' state (their lrs included) from the last good check, here the start's
    full lrs; the schedule still sets the next loop's lrs from the loop count. Forced: a tolerance of −1000 accuracy
    points rolls back at every check, whatever the weights."""
    shapes, defender = tiny
    settings = _settings(loops=4, anneal_from=1, anneal_floor=0.5, rollback_tolerance=-1000.0, check_every=2,
                         save_every=2)
    history = protect(model(), ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU,
                      state_dir=tmp_path, state_key="k")
    assert history.rollbacks == 2
    saved = read_state(tmp_path)  # after loop 2's rollback: the lrs of loop 3
    assert saved["loop"] == 2
    assert saved["suppress_opt"]["param_groups"][0]["lr"] == pytest.approx(
        settings.alpha * settings.lr * anneal_factor(3, settings))


def test_probe_direction_follows_the_objective():
    class Lower:
        higher_is_better = False

    data = ImageSet(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), ("x",))
    accuracy = Probe({"epochs": 1}, ClassificationObjective(), data, seed=0, device=CPU)
    mse = Probe({"epochs": 1}, Lower(), data, seed=0, device=CPU)
    assert accuracy.better_for_defender(10.0, 20.0) and not accuracy.better_for_defender(20.0, 10.0)
    assert mse.better_for_defender(0.9, 0.1) and not mse.better_for_defender(0.1, 0.9)
    with pytest.raises(ConfigError, match="sophon.probe: unknown keys steps"):
        Probe({"steps": 3}, Lower(), data, seed=0, device=CPU)


# --- diffusion timesteps, names, config ---------------------------------------------------------------------

def test_diffusion_suppression_draws_timesteps_from_its_range():
    from sophon.diffusion import DiffusionObjective

    seen = []

    def forward(x_t, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    ranged = DiffusionObjective("dos", suppress_timesteps=(10, 20))
    ranged.suppression_loss(forward, images, None, torch.Generator().manual_seed(0))
    ranged.finetune_loss(forward, images, None, torch.Generator().manual_seed(0))
    assert seen[0].min() >= 10 and seen[0].max() < 20 and seen[1].max() >= 20  # fine-tuning keeps all of them
    with pytest.raises(ConfigError, match=r"suppress_timesteps: \[20, 10\]"):
        DiffusionObjective("dos", suppress_timesteps=(20, 10))


def test_variant_name_lists_each_change_from_the_paper():
    assert variant_name(ProtectSettings()) == variant_name(ProtectSettings(), [0, 1000], "dos") == "paper"
    assert variant_name(ProtectSettings(), None, "inverse_noise") == "paper + inverse_noise suppression"
    changed = ProtectSettings(step_weighting="exponential", late_weight=4.0, select="probe", persist_loops=5,
                              task_space={"starts": ["direct", "reinit1+all"], "schedules": ["constant", "cosine"],
                                          "optimizers": ["adam", "adagrad"],
                                          "shrink_perturb": [{"shrink": 0.3, "perturb": 0.05}]})
    assert variant_name(changed, [0, 500]) == (
        "paper + starts reinit1+all + optimizers adagrad + shrink-and-perturbed starts 0.3:0.05 + scheduled inner lrs "
        "+ exponential step weights ×4 "
        "+ adversaries persist 5 loops + probe-selected checkpoint + suppression on t in [0, 500)")


def test_variant_name_names_the_strength_settings_that_differ_from_the_experiments_paper_settings():
    paper = {"alpha": 10.0, "beta": 10.0, "inner_steps": 4, "natural_steps": 4, "loops": 150, "rollback_tolerance": 0.1}
    same = ProtectSettings(alpha=10.0, beta=10.0, inner_steps=4, natural_steps=4, loops=150, rollback_tolerance=0.1)
    assert variant_name(same, None, "dos", paper) == "paper"
    assert variant_name(replace(same, alpha=30.0, loops=200), None, "dos", paper) == (
        "paper + α 30 (paper 10) + loops 200 (paper 150)")
    assert variant_name(replace(same, alpha=0.0), None, "dos", paper) == (
        "paper + no suppression step (α 0: the reinforcement alone, a control)")
    assert variant_name(replace(same, beta=20.0)) == "paper"  # without the paper's settings nothing to compare
    # The simulated adversaries' lrs and batch sizes, against the paper's task space (order does not matter).
    space = {"starts": ["direct"], "optimizers": ["adam"], "lrs": [0.003, 0.001], "batch_sizes": [8, 16]}
    spaced = {**paper, "task_space": {**space, "lrs": [0.001, 0.003]}}
    assert variant_name(replace(same, task_space=space), None, "dos", spaced) == "paper"
    assert variant_name(replace(same, task_space={**space, "batch_sizes": [4], "lrs": [0.01]}), None, "dos",
                        spaced) == "paper + adversary lrs 0.01 (paper 0.001/0.003) + adversary batches 4 (paper 8/16)"


def test_a_variant_is_named_against_the_paper_row_over_the_experiments_sophon_section():
    from stages.protect import protect_variant

    sophon = {"suppression": "ice", "natural_steps": 2, "loops": 350, "seed": 0}
    exp = {"sophon": sophon, "ablation": {"variants": {"paper": {"depth": {"weight": 0.0}}}}}
    assert protect_variant(exp, ProtectSettings(natural_steps=2, loops=350), sophon) == "paper"
    # natural_steps is not in the paper row: it inherits the experiment's 2, which a variant's 4 differs from
    changed = {**sophon, "natural_steps": 4, "seed": 1}
    assert protect_variant(exp, ProtectSettings(natural_steps=4, loops=350), changed) == (
        "paper + reinforcement steps 4 (paper 2) + protect seed 1 (paper 0)")


@pytest.mark.parametrize("start,message", [("lora", "lora adversary takes no depth term at adapted"), ("reinit_up+all", "not allowed for classification"),
                                           ("initFC+all", None), ("reinit2+all", None), ("reinit3+all", None)])
def test_config_checks_simulated_starts_by_key(tmp_path, project_dir, start, message):
    params = yaml.safe_load(open(f"{project_dir}/params.yaml"))
    params["experiments"]["quick-classification"]["sophon"]["task_space"]["starts"] = [start]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    if message is None:
        load_params(path)
        return
    with pytest.raises(ConfigError, match="quick-classification.sophon.task_space.starts' = .*" + message):
        load_params(path)


def test_several_probes_score_the_worst_case_for_the_defender(tiny):
    shapes, defender = tiny
    net = model()
    specs = [{"strategy": "initFC+all", "optimizer": "adam", "lr": lr, "batch_size": 30, "epochs": 1}
             for lr in (1e-4, 1e-2)]
    each = [Probe(spec, ClassificationObjective("ice"), defender, seed=0, device=CPU)(net) for spec in specs]
    both = Probe(specs, ClassificationObjective("ice"), defender, seed=0, device=CPU)(net)
    assert both == max(each)  # the best attacker's accuracy: the defender's worst case
    with pytest.raises(ConfigError, match="no probe attack"):
        Probe([], ClassificationObjective("ice"), defender, seed=0, device=CPU)


def test_probe_train_samples_sets_the_probe_split_and_is_checked():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    data = ImageSet(images, torch.zeros(20, dtype=torch.int64), ("x",))
    half = Probe({"epochs": 1}, ClassificationObjective(), data, seed=0, device=CPU)
    few = Probe({"epochs": 1}, ClassificationObjective(), data, seed=0, device=CPU, train_samples=4)
    assert (len(half.train), len(half.test)) == (10, 10) and (len(few.train), len(few.test)) == (4, 16)
    # The same seeded order: the few-shot probe's images are the first of the half split's, and no image is in both.
    assert torch.equal(few.train.images, half.train.images[:4])
    assert not set(few.train.images.flatten().tolist()) & set(few.test.images.flatten().tolist())
    for bad in (-1, 20):
        with pytest.raises(ConfigError, match="sophon.probe_train_samples"):
            Probe({"epochs": 1}, ClassificationObjective(), data, seed=0, device=CPU, train_samples=bad)
    named = variant_name(ProtectSettings(select="probe", probe_train_samples=100))
    assert "probe-selected checkpoint (probes on 100 images)" in named


@pytest.mark.parametrize("probe, message", [
    ([{"strategy": "reinit3+all", "optimizer": "momentum", "lr": 0.01, "batch_size": 8, "epochs": 9}], None),
    ({"strategy": "direct+all", "epochs": 3}, None),
    ([], "probe"),
    ([{"strategy": "direct+all", "optimizer": "adam"}], "probe"),  # no lr
    ([{"strategy": "direct+all", "optimizer": "adam", "lr": 0.01, "steps": 3}], "probe"),
    ([{"strategy": "reinit_up+all", "optimizer": "adam", "lr": 0.01}], r"probe.strategy' = reinit_up\+all"),
])
def test_params_probe_is_one_attack_or_a_list(tmp_path, project_dir, probe, message):
    params = yaml.safe_load(open(f"{project_dir}/params.yaml"))
    path = tmp_path / "params.yaml"
    params["experiments"]["quick-classification"]["sophon"].update(select="probe", probe=probe)
    path.write_text(yaml.safe_dump(params))
    if message is None:
        loaded = load_params(path)["experiments"]["quick-classification"]["sophon"]
        assert loaded["probe_train_samples"] == 0
        if isinstance(probe, list):
            assert loaded["probe"] == probe  # items get no defaults: AttackSettings fills them
        else:
            assert loaded["probe"]["epochs"] == 3 and loaded["probe"]["optimizer"] == "adagrad"  # defaults filled
        return
    with pytest.raises(ConfigError, match="quick-classification.sophon.probe"):
        load_params(path)


def test_redteam_selection_probes_are_the_held_out_red_team_attacks(project_dir):
    from sophon.config import load_params
    from stages.protect import protect_settings

    exp = load_params(f"{project_dir}/params.yaml")["experiments"]["quick-classification"]
    exp["name"] = "quick-classification"
    settings = protect_settings(exp, select="redteam", probe_epochs=3)
    held_out = {name: spec for name, spec in exp["redteam"]["attacks"].items() if spec["held_out"]}
    assert settings.select == "redteam" and len(settings.probe) == len(held_out) >= 1
    for probe, spec in zip(settings.probe, held_out.values()):
        assert probe == {**{k: v for k, v in spec.items() if k != "held_out"}, "epochs": 3}
    assert "redteam-selected checkpoint" in variant_name(settings)
    exp["redteam"]["attacks"] = {n: {**s, "held_out": False} for n, s in exp["redteam"]["attacks"].items()}
    with pytest.raises(ConfigError, match="sophon.select: redteam needs red-team attacks with held_out"):
        protect_settings(exp, select="redteam")


# --- focus on the strongest simulated adversaries ----------------------------------------------------------------

def test_task_sampler_without_focus_draws_what_sample_task_draws():
    import random

    from sophon.simulate import TaskSampler

    space = {"starts": ["initFC", "reinit2+all"], "optimizers": ["adam", "momentum"], "lrs": [1e-3, 1e-2],
             "batch_sizes": [8, 16]}
    sampler, rng = TaskSampler(space, random.Random(3)), random.Random(3)
    drawn = []
    for _ in range(30):
        drawn.append(sampler.draw())
        sampler.record(drawn[-1], 1.0)  # off: recording keeps nothing, and draws nothing extra
        assert sampler.recent == []
    assert drawn == [sample_task(space, rng) for _ in range(30)]


def test_task_sampler_replays_only_the_strongest_recent_configurations():
    import random

    from sophon.simulate import TaskSampler

    space = {"starts": ["initFC", "reinit1+all", "reinit2+all", "reinit3+all"], "optimizers": ["adam", "momentum"],
             "lrs": [1e-3, 3e-3, 1e-2], "batch_sizes": [8, 16, 64], "focus": {"share": 1.0, "top": 2, "window": 6}}
    sampler = TaskSampler(space, random.Random(0))
    drawn = [sampler.draw() for _ in range(8)]  # fewer than `top` recorded yet: all from the space
    strengths = [0.1, 5.0, 0.3, 4.0, 0.2, 0.4, 9.0, 0.5]
    for task, strength in zip(drawn, strengths):
        sampler.record(task, strength)
    sampler.record(drawn[0], float("nan"))  # a diverged adversary says nothing about strength
    assert [t for t, _ in sampler.recent] == drawn[2:]  # the window keeps the last 6
    strongest = {replace(drawn[6], seed=0), replace(drawn[3], seed=0)}  # 9.0 and 4.0; 5.0 left the window
    replays = [sampler.draw() for _ in range(40)]
    assert {replace(t, seed=0) for t in replays} == strongest
    assert len({t.seed for t in replays}) > 30  # a configuration replayed with fresh seeds
    half = TaskSampler({**space, "focus": {"share": 0.5, "top": 2, "window": 6}}, random.Random(0))
    half.restore(sampler.state())
    assert half.recent == sampler.recent and half.replays == sampler.replays == 40
    assert [item["strength"] for item in sampler.summary()["strongest"]] == [9.0, 4.0]
    mixed = [replace(half.draw(), seed=0) for _ in range(200)]
    assert 60 < sum(t in strongest for t in mixed) < 160  # about half replays (plus the space's own hits)


def test_protect_with_focus_resumes_exactly_and_names_it(tiny, tmp_path):
    space = {"starts": ["direct", "initFC"], "optimizers": ["adam", "momentum"], "lrs": [1e-2, 1e-3],
             "batch_sizes": [16], "focus": {"share": 0.5, "top": 1, "window": 3}}
    settings = _settings(loops=6, save_every=3, task_space=space)
    saved, history, _ = _resumed(tiny, tmp_path, settings)
    assert saved["loop"] == 3 and len(saved["sampler"]["recent"]) == 3
    assert history.focus["replays"] >= 1 and len(history.focus["strongest"]) == 1
    assert variant_name(settings).endswith("focus 0.5 (replays of the 1 strongest of the last 3 adversaries)")


def test_focus_top_beyond_its_window_is_an_error_naming_the_key(tmp_path):
    params = yaml.safe_load(open("params.yaml"))
    name = next(n for n, e in params["experiments"].items() if e["task"] == "classification")
    params["experiments"][name]["sophon"]["task_space"]["focus"] = {"share": 0.5, "top": 9, "window": 4}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=rf"key 'experiments.{name}.sophon.task_space.focus.top' = 9"):
        load_params(path)
