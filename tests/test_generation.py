"""Unit tests of the diffusion core (sophon.diffusion) and its use of the shared protect loop. Fast (CPU, tiny UNet)."""

import json
from dataclasses import replace

import pytest
import torch

from sophon.data import ImageSet
from sophon.diffusion import (DiffusionObjective, UNetSpec, build_unet, classify_run, denoise_one_step, evaluate_mse,
                              load_unet, make_scheduler, predict_noise, save_unet)
from sophon.errors import CheckpointError, ConfigError
from sophon.losses import get_loss
from sophon.protect import ProtectSettings, protect

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "attention": False, "norm_num_groups": 4}


def images(n, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, size, size), generator=generator, dtype=torch.uint8),
                    torch.zeros(n, dtype=torch.int64), ("x",))


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_unet(TINY, 8, 1)


def test_dos_gradient_matches_closed_form():
    """DoS = mean(ε_θ²): d/dε_θ = 2 ε_θ / numel (paper: gradient 2ε_θ, vanishing at ε_θ = 0)."""
    predicted = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    loss = get_loss("dos")(predicted, torch.randn_like(predicted))
    (grad,) = torch.autograd.grad(loss, predicted)
    torch.testing.assert_close(grad, 2 * predicted.detach() / predicted.numel())
    zero = torch.zeros_like(predicted, requires_grad=True)
    (grad0,) = torch.autograd.grad(get_loss("dos")(zero), zero)
    assert grad0.abs().max() == 0


def test_inverse_noise_value_and_gradient_match_closed_form():
    """‖ε_θ + ε‖² (mean): value, gradient 2(ε_θ + ε)/numel (finite differences agree), zero at ε_θ = −ε, where
    the noise-prediction MSE is 4·mean(ε²)."""
    generator = torch.Generator().manual_seed(0)
    predicted = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=generator)
    loss = get_loss("inverse_noise")(predicted, noise)
    assert loss.item() == pytest.approx(((predicted.detach() + noise) ** 2).mean().item())
    (grad,) = torch.autograd.grad(loss, predicted)
    torch.testing.assert_close(grad, 2 * (predicted.detach() + noise) / noise.numel())
    assert torch.autograd.gradcheck(lambda p: get_loss("inverse_noise")(p, noise), (predicted,))
    at_minimum = (-noise).requires_grad_(True)
    (grad0,) = torch.autograd.grad(get_loss("inverse_noise")(at_minimum, noise), at_minimum)
    assert grad0.abs().max() == 0
    assert get_loss("mse")(-noise, noise).item() == pytest.approx(4 * noise.pow(2).mean().item())


def test_negated_mse_gradient_grows_with_error():
    noise = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    for scale in (1.0, 10.0):
        predicted = torch.full_like(noise, scale, requires_grad=True)
        (grad,) = torch.autograd.grad(get_loss("neg_mse")(predicted, noise), predicted)
        torch.testing.assert_close(grad, -2 * (predicted.detach() - noise) / noise.numel())


def test_scheduler_is_the_papers_ddpm():
    scheduler = make_scheduler()
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_schedule == "linear"
    assert scheduler.betas[0].item() == pytest.approx(1e-4)
    assert scheduler.betas[-1].item() == pytest.approx(0.02)
    assert scheduler.config.prediction_type == "epsilon"


def test_training_samples_timesteps_uniformly_per_example():
    """Not t = 1 only (the reference code's defect): one t per example over the whole range."""
    objective = DiffusionObjective()
    seen = []

    def spy(x_t, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    objective.finetune_loss(spy, images(512).images, None, torch.Generator().manual_seed(0))
    t = seen[0]
    assert t.shape == (512,) and t.min() >= 0 and t.max() <= 999
    assert len(t.unique()) > 300 and t.float().mean().item() == pytest.approx(499.5, abs=60)


def test_fixed_noise_mse_is_reproducible_and_model_dependent():
    data, scheduler = images(10), make_scheduler()
    model = tiny_unet()
    first = evaluate_mse(model, data, scheduler, "cpu", seed=3, repeats=4)
    torch.randn(100)  # the global RNG must not matter
    assert evaluate_mse(model, data, scheduler, "cpu", seed=3, repeats=4) == first
    assert evaluate_mse(tiny_unet(seed=1), data, scheduler, "cpu", seed=3, repeats=4) != first


def test_zero_predictor_scores_noise_power():
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return x * 0

    mse = evaluate_mse(Zero(), images(50), make_scheduler(), "cpu", seed=0, repeats=8)
    assert mse == pytest.approx(1.0, abs=0.05)


def test_one_step_denoise_inverts_the_true_noise():
    scheduler = make_scheduler()
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 300, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    estimate = denoise_one_step(lambda x, tt: noise, scheduler, x_t, t)
    torch.testing.assert_close(estimate, x0, atol=1e-3, rtol=0)


def test_unet_checkpoint_round_trip_and_corruption(tmp_path):
    model = tiny_unet()
    spec = UNetSpec(8, 1, TINY)
    save_unet(model, tmp_path / "m", spec, {"original_test_mse": 0.5})
    loaded, card = load_unet(tmp_path / "m")
    assert card["kind"] == "unet" and card["original_test_mse"] == 0.5
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 500])
    model.eval(), loaded.eval()
    torch.testing.assert_close(predict_noise(loaded, x, t), predict_noise(model, x, t))
    weights = tmp_path / "m" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_unet(tmp_path / "m")
    card_path = tmp_path / "m" / "model.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "kind": "classifier"}))
    with pytest.raises(CheckpointError):
        load_unet(tmp_path / "m")


def test_bad_unet_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        build_unet({"block_out_channels": [10, 16], "norm_num_groups": 4}, 8, 1)
    with pytest.raises(ConfigError, match="image_size"):
        build_unet(TINY, 9, 1)
    with pytest.raises(ConfigError, match="suppression"):
        DiffusionObjective("ice")


def test_two_loop_protect_runs_and_changes_weights():
    model = tiny_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = ProtectSettings(loops=2, lr=1e-3, alpha=1.0, beta=1.0, inner_steps=2, eval_every=1, eval_batch_size=4,
                               natural_steps=1, natural_batch_size=4, check_every=1, rollback_tolerance=1e9,
                               task_space={"starts": ["direct"], "optimizers": ["adam", "momentum"], "lrs": [1e-3],
                                           "batch_sizes": [4], "lr_scale": {"momentum": 10.0}})
    history = protect(model, DiffusionObjective("dos"), images(8, seed=1), images(8, seed=2), images(4, seed=3),
                      settings, seed=0, device=torch.device("cpu"))
    assert len(history.suppression_loss) == 2 and all(v == v for v in history.suppression_loss)
    assert history.nonfinite == 0
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed


def test_an_averaged_release_of_a_unet_is_the_mean_of_its_checks():
    """average_from on a model without batch norm (update_bn leaves it): the mean of the checks' parameters."""
    settings = ProtectSettings(loops=2, lr=1e-3, alpha=1.0, beta=1.0, inner_steps=2, eval_every=1, eval_batch_size=4,
                               natural_steps=1, natural_batch_size=4, check_every=1, rollback_tolerance=1e9,
                               task_space={"starts": ["direct"], "optimizers": ["adam"], "lrs": [1e-3],
                                           "batch_sizes": [4]})
    runs = {}
    for loops, average_from in ((1, 0), (2, 0), (2, 1)):
        runs[loops, average_from] = model = tiny_unet()
        history = protect(model, DiffusionObjective("dos"), images(8, seed=1), images(8, seed=2), images(4, seed=3),
                          replace(settings, loops=loops, average_from=average_from), seed=0,
                          device=torch.device("cpu"))
    assert history.averaged_loops == [1, 2]
    for (name, p), p1, p2 in zip(runs[2, 1].named_parameters(), runs[1, 0].parameters(), runs[2, 0].parameters()):
        assert torch.allclose(p, (p1 + p2) / 2, atol=1e-6), name
    assert any(not torch.allclose(p, p2) for p, p2 in zip(runs[2, 1].parameters(), runs[2, 0].parameters()))


def test_stability_counter():
    assert classify_run([1.0, 0.5, 0.1], threshold=10) == "stable"
    assert classify_run([-0.1, -3.0, float("nan")], threshold=10) == "nan"
    assert classify_run([-0.1, float("inf")], threshold=10) == "nan"
    assert classify_run([-0.1, -50.0, -2.0], threshold=10) == "diverged"
    assert classify_run([], threshold=10) == "stable"


def test_diffusion_attack_runs_through_the_one_finetune_and_rejects_a_head_reset():
    from sophon.attacks import AttackSettings, get_attack
    from sophon.diffusion import DiffusionObjective

    attack = get_attack("finetune")
    objective = DiffusionObjective(eval_repeats=1)
    settings = AttackSettings(optimizer="adam", lr=1e-3, batch_size=4, weight_decay=0.0, epochs=2)
    curve = attack(tiny_unet(), images(8), images(4, seed=5), settings, seed=0, device=torch.device("cpu"),
                   objective=objective)
    assert len(curve) == 3 and all(v > 0 for v in curve)
    with pytest.raises(ConfigError, match="initFC"):
        attack(tiny_unet(), images(8), images(4), AttackSettings(strategy="initFC+all"), seed=0,
               device=torch.device("cpu"), objective=objective)
