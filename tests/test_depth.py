"""Suppression at depth: every stage's output per model family (sophon.features), and the protect loop's depth term
(sophon.protect.DepthTerm, `sophon.depth`) and basin term (sophon.protect.BasinTerm, `sophon.basin`): each off by
default and then bit-identical to the paper's loop."""

import copy

import pytest
import torch
import yaml

from sophon.config import load_params
from sophon.data import DomainRequest, load_domain
from sophon.errors import ConfigError
from sophon.features import _hooked, _stage_module, feature_stages, stage_features
from sophon.models import build_classifier
from sophon.objectives import ClassificationObjective
from sophon.protect import BASIN, DEPTH, BasinTerm, DepthTerm, ProtectSettings, protect, variant_name

CPU = torch.device("cpu")


def resnet():
    torch.manual_seed(0)
    return build_classifier("test_resnet", 10).eval()


def tiny_unet():
    from sophon.diffusion import build_unet

    torch.manual_seed(0)
    return build_unet({"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}, 8, 1).eval()


def all_weights(model):
    return {**{n: p.detach().clone() for n, p in model.named_parameters()},
            **{n: b.clone() for n, b in model.named_buffers()}}


def manual_resnet(model, x):
    net, h = model.net, model._normalize(x)
    h = net.maxpool(net.act1(net.bn1(net.conv1(h))))
    out = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        h = layer(h)
        out.append(h)
    return out


def manual_unet(unet, x, t):
    emb = unet.time_embedding(unet.time_proj(t * torch.ones(len(x), dtype=t.dtype)).to(unet.dtype))
    h, out = unet.conv_in(x), []
    for block in unet.down_blocks:
        h, _ = block(hidden_states=h, temb=emb)
        out.append(h)
    out.append(unet.mid_block(h, emb))
    return out


# --- the stage-features helper --------------------------------------------------------------------------------

def test_resnet_stage_features_equal_a_manual_forward_through_the_stages():
    model, x = resnet(), torch.rand(3, 3, 16, 16)
    assert feature_stages(model) == ["net.layer1", "net.layer2", "net.layer3", "net.layer4"]
    expected = manual_resnet(model, x)
    got = stage_features(model, (x,))  # timm's forward_intermediates
    hooked = _hooked(model, (x,), None, [_stage_module(model, n) for n in feature_stages(model)], lambda o: o)
    assert len(got) == len(hooked) == 4
    for a, b, c in zip(got, hooked, expected):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    # With a parameter dict (the simulation's adapted weights): those weights, and gradients reach them.
    weights = all_weights(model)
    params = dict(model.named_parameters())
    scaled = {n: (v * 1.1).requires_grad_(True) if n in params else v for n, v in weights.items()}
    replica = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in replica.named_parameters():
            p.copy_(scaled[n])
    functional = stage_features(model, (x,), scaled)
    for a, c in zip(functional, manual_resnet(replica, x)):
        torch.testing.assert_close(a, c)
    functional[0].sum().backward()
    assert scaled["net.conv1.0.weight"].grad is not None and scaled["net.layer4.0.conv1.weight"].grad is None
    assert all(p.grad is None for p in model.parameters())  # the model's own weights are untouched
    assert [f.shape[1] for f in stage_features(model, (x,), stages=feature_stages(model, "early"))] == [
        f.shape[1] for f in expected[:2]]
    assert len(feature_stages(model, "deep")) == 2


def test_paper_vgg_stage_features_come_from_hooks_on_its_slices():
    torch.manual_seed(0)
    model = build_classifier("paper_vgg", 10).eval()
    x = torch.rand(2, 3, 32, 32)
    got = stage_features(model, (x,))
    h, expected = model._normalize(x), []
    layers = model.net.features[0]
    for name in feature_stages(model):
        start, stop = map(int, name[name.index("[") + 1:-1].split(":"))
        h = layers[start:stop](h)
        expected.append(h)
        h = layers[stop](h)  # the max-pool between stages
    assert len(got) == 5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unet_stage_features_are_its_down_blocks_and_mid_block():
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    assert feature_stages(unet) == ["down_blocks.0", "down_blocks.1", "mid_block"]
    expected = manual_unet(unet, x, t)
    got = stage_features(unet, (x, t))
    functional = stage_features(unet, (x, t), all_weights(unet))
    assert len(got) == len(functional) == 3
    for a, b, c in zip(got, functional, expected):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.testing.assert_close(b, c, rtol=0, atol=0)
    assert not unet.down_blocks[0]._forward_hooks  # the hooks are gone


# --- the protect loop's depth term ----------------------------------------------------------------------------

def _settings(**changes):
    return ProtectSettings(**{**dict(loops=4, inner_steps=2, eval_every=1, eval_batch_size=16, natural_steps=1,
                                     natural_batch_size=16, check_every=2, rollback_tolerance=100.0,
                                     task_space={"starts": ["direct", "reinit2+all"], "optimizers": ["adam"],
                                                 "lrs": [1e-2], "batch_sizes": [16]}), **changes})


def _protected(tiny, **changes):
    shapes, defender = tiny
    net = resnet()
    history = protect(net, ClassificationObjective("ice"), defender, shapes, shapes, _settings(**changes), seed=0,
                      device=CPU)
    return net, history


def _mmd(net, defender):
    """The depth term's MMD of the stage features of 64 restricted images, fixed noise (seed 123)."""
    term = DepthTerm(net.train(), ClassificationObjective("ice"), {**DEPTH, "weight": 1.0}, seed=123)
    with torch.no_grad():  # train mode, as in the loop: batch statistics (the term runs on a copy of the buffers)
        return term(defender.images[:64]).item()


def test_depth_weight_zero_is_the_paper_loop_bit_for_bit(tiny):
    default, history = _protected(tiny)
    zero, _ = _protected(tiny, depth={"weight": 0.0, "at": "both", "stages": "early"})
    for (name, a), b in zip(default.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), name
    assert history.depth_loss == [] and history.adapted_depth_loss == []


@pytest.mark.parametrize("at", ["released", "adapted", "both"])
def test_depth_suppression_changes_the_weights_and_lowers_the_mmd_to_noise(tiny, at):
    _, defender = tiny
    paper, _ = _protected(tiny, loops=6, beta=50.0)
    deep, history = _protected(tiny, loops=6, beta=50.0, alpha=50.0, depth={"weight": 20.0, "at": at})
    assert any(not torch.equal(a, b) for a, b in zip(paper.state_dict().values(), deep.state_dict().values()))
    start = _mmd(resnet(), defender)
    assert _mmd(deep, defender) < 0.9 * start, (start, _mmd(deep, defender))
    assert _mmd(deep, defender) < _mmd(paper, defender)
    assert len(history.depth_loss) == (6 if at != "adapted" else 0)
    assert len(history.adapted_depth_loss) == (6 if at != "released" else 0)


def test_depth_term_gradient_points_towards_noise(tiny):
    """One gradient step on the depth term at the released weights lowers it (same inputs, same noise)."""
    _, defender = tiny
    net = resnet().train()
    term = DepthTerm(net, ClassificationObjective("ice"), {**DEPTH, "weight": 1.0}, seed=5)
    state = term.generator.get_state()
    loss = term(defender.images[:32])
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad / max(1e-12, p.grad.norm().item())
    term.generator.set_state(state)
    with torch.no_grad():
        assert term(defender.images[:32]).item() < loss.item()


def test_probe_depth_term_reads_the_labels_and_its_gradient_lowers_it(tiny):
    """`loss: probe`: the term is probe_readout of the stage features with the batch's labels, and one step on it
    lowers it (same batch); in the loop it is recorded at both places and named."""
    from sophon.losses import probe_readout

    _, defender = tiny
    net = resnet().train()
    term = DepthTerm(net, ClassificationObjective("ice"), {**DEPTH, "weight": 1.0, "loss": "probe"}, seed=5)
    images, labels = defender.images[:64], defender.labels[:64]
    with pytest.raises(ValueError, match="reads labels"):
        term(images)
    loss = term(images, labels=labels)
    features = stage_features(net, (images.float() / 255,), all_weights(net))
    assert loss.item() == pytest.approx(probe_readout(features, labels).item(), rel=1e-5)
    assert loss.item() > 0
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad / max(1e-12, p.grad.norm().item())
        assert term(images, labels=labels).item() < loss.item()
    _, history = _protected(tiny, loops=2, depth={"weight": 1.0, "at": "both", "loss": "probe"})
    assert len(history.depth_loss) == len(history.adapted_depth_loss) == 2
    assert variant_name(ProtectSettings(depth={"weight": 1.0, "loss": "probe", "at": "both"})) == (
        "paper + depth probe readout ×1 at released and adapted weights")


def test_depth_on_a_diffusion_unet_runs(tiny):
    from sophon.diffusion import DiffusionObjective

    _, defender = tiny
    faces = load_domain("digits", DomainRequest(size=8, channels=1)).subset(range(48))
    unet = tiny_unet().train()
    settings = ProtectSettings(loops=2, inner_steps=2, eval_every=1, eval_batch_size=8, natural_steps=1,
                               natural_batch_size=8, check_every=2, rollback_tolerance=100.0,
                               task_space={"starts": ["direct"], "optimizers": ["adam"], "lrs": [1e-3],
                                           "batch_sizes": [8]}, depth={"weight": 1.0, "at": "both"},
                               basin={"weight": 1.0, "loss": "mmd"})
    history = protect(unet, DiffusionObjective("dos"), faces, faces, faces, settings, seed=0, device=CPU)
    assert len(history.depth_loss) == len(history.adapted_depth_loss) == len(history.basin_loss) == 2
    assert all(v == v for v in history.depth_loss + history.adapted_depth_loss + history.basin_loss)


def test_depth_settings_are_checked_and_named(tiny):
    shapes, defender = tiny
    with pytest.raises(ConfigError, match="sophon.depth: unknown keys on"):
        protect(resnet(), ClassificationObjective(), defender, shapes, shapes, _settings(depth={"on": "adapted"}),
                seed=0, device=CPU)
    with pytest.raises(ConfigError, match="sophon.depth.loss: 'noise'"):
        protect(resnet(), ClassificationObjective(), defender, shapes, shapes,
                _settings(depth={"weight": 1.0, "loss": "noise"}), seed=0, device=CPU)
    with pytest.raises(ConfigError, match="probe reads class labels"):
        from sophon.diffusion import DiffusionObjective

        DepthTerm(tiny_unet(), DiffusionObjective("dos"), {**DEPTH, "weight": 1.0, "loss": "probe"}, seed=0)
    with pytest.raises(ConfigError, match="natural_steps is 0"):
        protect(resnet(), ClassificationObjective(), defender, shapes, shapes,
                _settings(natural_steps=0, depth={"weight": 1.0}), seed=0, device=CPU)
    assert variant_name(ProtectSettings(depth={"weight": 0.0, "at": "both"})) == "paper"
    assert variant_name(ProtectSettings(depth={"weight": 2.0})) == "paper + depth MMD ×2"
    assert variant_name(ProtectSettings(depth={"weight": 0.5, "at": "adapted", "stages": "early"})) == (
        "paper + depth MMD ×0.5 on early stages at adapted weights")


@pytest.mark.parametrize("experiment", ["quick-classification", "quick-generation"])
def test_config_accepts_the_depth_section(tmp_path, project_dir, experiment):
    params = yaml.safe_load(open(f"{project_dir}/params.yaml"))
    section = params["experiments"][experiment]["sophon"]
    # The schema fills the keys a config leaves out with the paper's values (weight 0: no depth term).
    assert load_params(f"{project_dir}/params.yaml")["experiments"][experiment]["sophon"]["depth"] == {
        **DEPTH, **section.get("depth", {})}
    section["depth"] = {"weight": 1.0, "at": "adapted", "stages": "early"}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert load_params(path)["experiments"][experiment]["sophon"]["depth"]["at"] == "adapted"
    section["depth"] = {"weight": 1.0, "loss": "probe"}  # a diffusion batch has no labels to read
    path.write_text(yaml.safe_dump(params))
    if experiment == "quick-classification":
        assert load_params(path)["experiments"][experiment]["sophon"]["depth"]["loss"] == "probe"
    else:
        with pytest.raises(ConfigError, match="depth"):
            load_params(path)
    section["depth"] = {"weight": 1.0, "on": "adapted"}
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="depth"):
        load_params(path)


def test_protect_with_depth_resumes_exactly(tiny, tmp_path):
    shapes, defender = tiny
    settings = _settings(loops=3, save_every=1, depth={"weight": 5.0, "at": "both"})
    uninterrupted = resnet()
    protect(uninterrupted, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU,
            state_dir=tmp_path, state_key="k")  # leaves the state saved after loop 2
    resumed = resnet()
    protect(resumed, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU,
            state_dir=tmp_path, state_key="k")  # the depth term's generator and batches resume too
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_stage_readout_is_per_stage_reproducible_and_reads_more_from_a_trained_model(tiny):
    """sophon.features.stage_readout: one value per stage, the same twice, the model's mode kept; a classifier
    trained on the restricted labels reads them better at its last stage than its random init does."""
    from sophon.features import stage_readout
    from sophon.train import to_input

    _, defender = tiny
    net = resnet().train()
    first = stage_readout(net, defender, CPU, batch_size=32, batches=2)
    assert len(first) == 4 and all(0.0 <= v <= 1.0 for v in first)
    assert stage_readout(net, defender, CPU, batch_size=32, batches=2) == first
    assert net.training
    assert len(stage_readout(net, defender.subset(range(10)), CPU)) == 4  # fewer than a batch: one batch of all
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(to_input(defender.images[:64], CPU)), defender.labels[:64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = stage_readout(net, defender.subset(range(64)), CPU, batch_size=64, batches=1)
    untrained = stage_readout(resnet(), defender.subset(range(64)), CPU, batch_size=64, batches=1)
    assert trained[-1] > untrained[-1] + 0.1, (trained, untrained)


# --- out of the basin: the depth loss on the line to the original weights ------------------------------------------

def _moved(net, scale=0.05):
    """Move every parameter off where it is (seeded), so the line from the weights to the original has length."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def test_basin_term_is_the_depth_loss_at_a_point_of_the_line_with_its_gradient_scaled_by_one_minus_a(tiny):
    from sophon.losses import probe_readout

    _, defender = tiny
    net = resnet().train()
    original = {name: p.detach().clone() for name, p in net.named_parameters()}
    term = BasinTerm(net, ClassificationObjective("ice"), {**BASIN, "weight": 1.0, "reach": 0.8}, seed=3)
    _moved(net)
    images, labels = defender.images[:64], defender.labels[:64]
    state = term.generator.get_state()
    a = float(torch.rand((), generator=term.generator)) * 0.8
    term.generator.set_state(state)
    assert 0 < a < 0.8
    loss = term(images, labels)
    loss.backward()
    # Closed form: the probe readout at θ(a) = (1 − a)·θ + a·θ_original, differentiated at that point.
    point = {name: ((1 - a) * p + a * original[name]).detach().requires_grad_(True) for name, p in net.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in net.named_buffers()}
    expected = probe_readout(stage_features(net, (images.float() / 255,), {**point, **buffers}), labels)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    for name, p in net.named_parameters():
        if point[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            torch.testing.assert_close(p.grad, (1 - a) * point[name].grad, rtol=1e-4, atol=1e-7)
    for name, value in term.original.items():  # the original weights are the term's own copy, not moved
        assert torch.equal(value, original[name]), name


def test_basin_weight_zero_is_the_paper_loop_bit_for_bit_and_a_weight_moves_the_weights(tiny):
    default, _ = _protected(tiny)
    zero, history = _protected(tiny, basin={"weight": 0.0, "reach": 1.0})
    for (name, a), b in zip(default.state_dict().items(), zero.state_dict().values()):
        assert torch.equal(a, b), name
    assert history.basin_loss == []
    basin, history = _protected(tiny, basin={"weight": 5.0})
    assert len(history.basin_loss) == 4 and all(0 <= v <= 1 for v in history.basin_loss)
    assert any(not torch.equal(a, b) for a, b in zip(default.state_dict().values(), basin.state_dict().values()))


def test_protect_with_basin_resumes_exactly(tiny, tmp_path):
    shapes, defender = tiny
    settings = _settings(loops=3, save_every=1, basin={"weight": 5.0, "reach": 0.7})
    uninterrupted = resnet()
    protect(uninterrupted, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU,
            state_dir=tmp_path, state_key="k")  # leaves the state saved after loop 2
    resumed = resnet()  # the start model again: the term's original weights are read before the state is loaded
    protect(resumed, ClassificationObjective("ice"), defender, shapes, shapes, settings, seed=0, device=CPU,
            state_dir=tmp_path, state_key="k")
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_basin_settings_are_checked_and_named(tiny):
    from sophon.diffusion import DiffusionObjective

    shapes, defender = tiny
    for basin, message in [({"far": 1}, "sophon.basin: unknown keys far"),
                           ({"weight": 1.0, "reach": 0.0}, "sophon.basin.reach: 0.0 is not in"),
                           ({"weight": 1.0, "reach": 1.5}, "sophon.basin.reach: 1.5 is not in"),
                           ({"weight": -1.0}, "sophon.basin.weight: -1.0"),
                           ({"weight": 1.0, "loss": "noise"}, "sophon.basin.loss: 'noise'")]:
        with pytest.raises(ConfigError, match=message):
            protect(resnet(), ClassificationObjective(), defender, shapes, shapes, _settings(basin=basin), seed=0,
                    device=CPU)
    with pytest.raises(ConfigError, match="sophon.basin.weight: the basin term is added to the reinforcement"):
        protect(resnet(), ClassificationObjective(), defender, shapes, shapes,
                _settings(natural_steps=0, basin={"weight": 1.0}), seed=0, device=CPU)
    with pytest.raises(ConfigError, match="sophon.basin.loss: probe reads class labels"):
        BasinTerm(tiny_unet(), DiffusionObjective("dos"), {**BASIN, "weight": 1.0}, seed=0)
    assert variant_name(ProtectSettings(basin={"weight": 0.0})) == "paper"
    assert variant_name(ProtectSettings(basin={"weight": 2.0, "reach": 0.5})) == (
        "paper + basin probe readout ×2 on the line to the original weights (a < 0.5)")


@pytest.mark.parametrize("experiment", ["quick-classification", "quick-generation"])
def test_config_fills_and_checks_the_basin_section(tmp_path, project_dir, experiment):
    params = yaml.safe_load(open(f"{project_dir}/params.yaml"))
    section = params["experiments"][experiment]["sophon"]
    loss = "probe" if experiment == "quick-classification" else "mmd"  # a diffusion batch has no labels to read
    assert load_params(f"{project_dir}/params.yaml")["experiments"][experiment]["sophon"]["basin"] == {
        "weight": 0.0, "reach": 0.5, "loss": loss}
    path = tmp_path / "params.yaml"
    for bad in ({"weight": 1.0, "reach": 0}, {"weight": 1.0, "reach": 2}, {"weight": 1.0, "far": 1}):
        section["basin"] = bad
        path.write_text(yaml.safe_dump(params))
        with pytest.raises(ConfigError, match="basin"):
            load_params(path)
