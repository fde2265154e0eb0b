"""Loss values and gradients against the closed forms of the paper (Eq. 10, 12, 14, 16; Appendix A)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sophon.errors import UnknownNameError
from sophon.losses import get_loss


def logits_and_labels(n=6, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 3, torch.randint(0, c, (n,), generator=g)


def grad_of(name, z, y):
    z = z.clone().requires_grad_(True)
    get_loss(name)(z, y).backward()
    return z.grad


def test_ce_gradient_is_p_minus_onehot():
    z, y = logits_and_labels()
    p = z.softmax(-1)
    expected = (p - F.one_hot(y, 10)) / len(y)
    assert torch.allclose(grad_of("ce", z, y), expected, atol=1e-12)


def test_ice_value_and_gradient_match_closed_form():
    z, y = logits_and_labels()
    p = z.softmax(-1)
    p_y = p.gather(1, y[:, None])
    assert torch.isclose(get_loss("ice")(z, y), (-torch.log(1 - p_y)).mean())
    # Eq. 12: dICE/dz = p_y / (1 − p_y) · (onehot(y) − p)
    expected = p_y / (1 - p_y) * (F.one_hot(y, 10) - p) / len(y)
    assert torch.allclose(grad_of("ice", z, y), expected, atol=1e-10)


def test_ice_gradient_vanishes_as_p_y_goes_to_zero_and_stays_finite():
    y = torch.tensor([0])
    norms = []
    for margin in (0.0, 5.0, 20.0, 200.0):
        z = torch.zeros(1, 10, dtype=torch.float64)
        z[0, 0] = -margin  # p_y → 0 as the margin grows
        g = grad_of("ice", z, y)
        assert torch.isfinite(g).all() and torch.isfinite(get_loss("ice")(z, y))
        norms.append(g.norm().item())
    assert norms == sorted(norms, reverse=True) and norms[-1] < 1e-50


def test_balanced_ice_value_and_gradient_match_closed_form():
    z, y = logits_and_labels(n=9, c=4, seed=3)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])  # class 3 absent: the mean runs over the batch's 3 classes
    p = z.softmax(-1)
    p_y = p.gather(1, y[:, None])
    ice = -torch.log(1 - p_y).squeeze(1)
    per_class = [ice[y == k].mean() for k in (0, 1, 2)]
    assert torch.isclose(get_loss("ice_balanced")(z, y), sum(per_class) / 3)
    weight = torch.tensor([1 / 12] * 4 + [1 / 6] * 2 + [1 / 9] * 3, dtype=torch.float64)[:, None]  # 1/(n_y · 3)
    expected = weight * p_y / (1 - p_y) * (F.one_hot(y, 4) - p)
    assert torch.allclose(grad_of("ice_balanced", z, y), expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: get_loss("ice_balanced")(t, y), z.clone().requires_grad_(True))


def test_balanced_ice_equals_ice_on_a_balanced_batch():
    z, _ = logits_and_labels(n=8, c=4, seed=1)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    assert torch.isclose(get_loss("ice_balanced")(z, y), get_loss("ice")(z, y))


def test_ice_pulls_an_input_blind_answer_to_the_rarest_class_and_balanced_ice_does_not():
    # Uniform logits, class 3 rarest: ICE's gradient is (share − u)/(C − 1) (Eq. 12 at p = u), so a descent step
    # raises the rarest class's logit; balanced ICE's gradient there is zero.
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    z = torch.zeros(len(y), 4, dtype=torch.float64)
    share = torch.tensor([0.3, 0.3, 0.3, 0.1], dtype=torch.float64)
    assert torch.allclose(grad_of("ice", z, y).sum(0), (share - 0.25) / 3, atol=1e-12)
    assert grad_of("ice", z, y).sum(0).argmin() == 3
    assert torch.allclose(grad_of("ice_balanced", z, y).sum(0), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_klu_value_and_gradient_match_closed_form():
    z, y = logits_and_labels()
    p = z.softmax(-1)
    u = torch.full_like(p, 0.1)
    kl = (u * (u.log() - p.log())).sum(-1).mean()
    assert torch.isclose(get_loss("klu")(z, y), kl)
    # Eq. 14: dKLU/dz = p − u, zero when p is uniform
    assert torch.allclose(grad_of("klu", z, y), (p - u) / len(y), atol=1e-12)
    assert torch.allclose(grad_of("klu", torch.ones(3, 10, dtype=torch.float64), y[:3]), torch.zeros(3, 10, dtype=torch.float64))


def test_dos_gradient_is_twice_the_prediction():
    eps = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    get_loss("dos")(eps, torch.randn_like(eps)).backward()
    assert torch.allclose(eps.grad, 2 * eps.detach() / eps.numel())


def test_negated_losses_are_negations():
    z, y = logits_and_labels()
    assert torch.isclose(get_loss("neg_ce")(z, y), -get_loss("ce")(z, y))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.isclose(get_loss("neg_mse")(a, b), -get_loss("mse")(a, b))


def test_klu_is_zero_at_uniform():
    assert get_loss("klu")(torch.zeros(4, 10), None).abs() < 1e-6
    assert math.isclose(get_loss("klu")(torch.tensor([[100.0, 0.0]]), None).item(), -math.log(2) + 50.0, rel_tol=1e-4)


def test_unknown_loss_names_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown loss 'foo'.*ice"):
        get_loss("foo")


# --- suppression at depth: MMD² to Gaussian noise ---------------------------------------------------------------

def test_mmd_to_noise_is_about_zero_for_noise_and_clearly_positive_for_a_constant_batch():
    from sophon.losses import mmd_to_noise

    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(128, 16, 4, 4, generator=g), torch.randn(128, 64, generator=g)]
    # Pooled to at most 256 dims (16 channels × 4 × 4 stays; an average-pooled map would not be standard
    # Gaussian, so the noise is given at the pooled size here).
    assert abs(mmd_to_noise(noise, torch.Generator().manual_seed(1)).item()) < 0.01
    constant = [torch.full((128, 16, 4, 4), 0.5), torch.zeros(128, 64)]
    assert mmd_to_noise(constant, torch.Generator().manual_seed(1)).item() > 0.1
    # The same generator state gives the same noise, so the same value.
    assert mmd_to_noise(constant, torch.Generator().manual_seed(1)) == mmd_to_noise(
        constant, torch.Generator().manual_seed(1))


def test_pooled_features_stay_within_max_dims():
    from sophon.losses import pooled_features

    assert pooled_features(torch.rand(2, 16, 8, 8)).shape == (2, 256)  # 16 × 4 × 4
    assert pooled_features(torch.rand(2, 48, 8, 8)).shape == (2, 192)  # 48 × 2 × 2
    assert pooled_features(torch.rand(2, 512, 3, 3)).shape == (2, 256)  # global pool, then along the channels
    assert pooled_features(torch.rand(2, 10)).shape == (2, 10)


def test_mmd_to_noise_gradient_matches_finite_differences():
    from sophon.losses import mmd_to_noise

    x = torch.randn(6, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.5 + 1.0

    def loss(features):  # the same noise at every call
        return mmd_to_noise([features], torch.Generator().manual_seed(7))

    leaf = x.clone().requires_grad_(True)
    loss(leaf).backward()
    assert leaf.grad.abs().sum() > 0
    eps = 1e-3
    for index in [(0, 0, 0, 0), (2, 1, 0, 1), (5, 1, 1, 1)]:
        up, down = x.clone(), x.clone()
        up[index] += eps
        down[index] -= eps
        numeric = (loss(up) - loss(down)).item() / (2 * eps)
        assert numeric == pytest.approx(leaf.grad[index].item(), rel=1e-4, abs=1e-8)


# --- suppression at depth: a linear probe's readout of the labels --------------------------------------------

def _primal_ridge_r2(z_fit, y_fit, z_test, y_test, ridge):
    """The same probe in its primal form (numpy): W = (Z_AᵀZ_A + ridge·d·I)⁻¹ Z_Aᵀ (Y_A − ȳ_A)."""
    d = z_fit.shape[1]
    mean = y_fit.mean(0)
    w = np.linalg.solve(z_fit.T @ z_fit + ridge * d * np.eye(d), z_fit.T @ (y_fit - mean))
    predicted = mean + z_test @ w
    return 1 - ((y_test - predicted) ** 2).sum() / ((y_test - mean) ** 2).sum()


def test_probe_readout_equals_the_primal_ridge_probe():
    from sophon.losses import probe_readout

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % 3
    # Features that carry the labels, plus noise: a readout well above 0.
    x = torch.randn(12, 5, dtype=torch.float64, generator=g) + 2.0 * F.one_hot(labels, 5)
    var = x.var(0, unbiased=False)
    z = ((x - x.mean(0)) / (var + 1e-5 * var.mean() + 1e-12).sqrt()).numpy()
    y = np.eye(3)[labels.numpy()]
    expected = np.mean([_primal_ridge_r2(z[:6], y[:6], z[6:], y[6:], 1.0),
                        _primal_ridge_r2(z[6:], y[6:], z[:6], y[:6], 1.0)])
    assert expected > 0.2
    assert probe_readout(x, labels).item() == pytest.approx(expected, rel=1e-9)
    # Standardised: shrinking the features (the shrink-and-perturb attacker's move) hides nothing.
    assert probe_readout(0.01 * x, labels).item() == pytest.approx(expected, rel=1e-6)
    # Two stages: the mean of each.
    noise = torch.randn(12, 5, dtype=torch.float64, generator=g)
    assert probe_readout([x, noise], labels).item() == pytest.approx(
        (expected + probe_readout(noise, labels).item()) / 2, rel=1e-9)


def test_probe_readout_is_near_one_for_the_labels_and_zero_for_noise():
    from sophon.losses import probe_readout

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (128,), generator=g)
    carrying = F.one_hot(labels, 10).float() + 0.01 * torch.randn(128, 10, generator=g)
    assert probe_readout(carrying, labels, ridge=1e-3).item() > 0.95
    assert probe_readout(torch.randn(128, 32, generator=g), labels).item() == 0.0  # clamped: reads nothing
    with pytest.raises(ValueError, match="at least 4"):
        probe_readout(carrying[:3], labels[:3])


def test_probe_readout_gradient_matches_finite_differences():
    from sophon.losses import probe_readout

    g = torch.Generator().manual_seed(1)
    labels = torch.arange(12) % 3
    x = torch.randn(12, 2, 2, 2, dtype=torch.float64, generator=g) + 3 * F.one_hot(
        labels, 8).double().reshape(12, 2, 2, 2)
    assert probe_readout([x], labels, ridge=0.1).item() > 0  # not clamped: the gradient is the probe's own
    assert torch.autograd.gradcheck(lambda h: probe_readout([h], labels, ridge=0.1),
                                    (x.clone().requires_grad_(True),))
