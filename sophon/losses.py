"""Loss registry. Classification losses take logits z (N×C) and labels y; p = softmax(z).
Diffusion losses take the predicted noise and the true noise."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from sophon.errors import unknown

LOSSES: dict[str, Callable[..., torch.Tensor]] = {}


def register_loss(name: str):
    def wrap(fn):
        LOSSES[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    if name not in LOSSES:
        raise unknown("loss", name, LOSSES)
    return LOSSES[name]


@register_loss("ce")
def cross_entropy(logits, labels):
    """CE = −log p_y. Gradient w.r.t. z: p − onehot(y) (paper Eq. 10, Appendix A.2)."""
    return F.cross_entropy(logits, labels)


@register_loss("ice")
def inverse_cross_entropy(logits, labels):
    """ICE = −log(1 − p_y) (paper Eq. 11), computed stably as logsumexp(z) − logsumexp(z without z_y).
    Gradient w.r.t. z: p_y/(1−p_y)·(onehot(y) − p) (Eq. 12); it vanishes as p_y → 0, so suppression converges."""
    return _ice_terms(logits, F.one_hot(labels, logits.shape[-1]).bool()).mean()


def _ice_terms(logits, is_label):
    """Per sample −log(1 − p_y) = logsumexp(z) − logsumexp(z without z_y); `is_label`: y's one-hot mask."""
    return torch.logsumexp(logits, -1) - torch.logsumexp(logits.masked_fill(is_label, float("-inf")), -1)


@register_loss("ice_balanced")
def class_balanced_inverse_cross_entropy(logits, labels):
    """ICE with every class in the batch weighing the same: the mean over the batch's classes of each class's mean
    −log(1 − p_y), i.e. sample i weighs 1 / (n_{y_i} · K_b), n_k the batch's count of class k, K_b its classes.

    Why: plain ICE's best answer that ignores the input is q_k = 1 − (C − 1)·n_k/N, so a small imbalance of the
    defender's labels becomes a (C − 1)-fold pull towards its rarest class (the quick profile's defender digits: 3 at
    9.6 % → q 13.6 %, against 6.4 % for its most common class at 10.4 %). With equal class weights that answer is
    uniform. Gradient w.r.t. z_i: w_i·p_y/(1−p_y)·(onehot(y) − p) (Eq. 12, weighted). One-hot arithmetic only, so
    it runs under torch.func.vmap (sophon.simulate)."""
    is_label = F.one_hot(labels, logits.shape[-1]).bool()
    onehot = is_label.to(logits.dtype)
    counts = onehot.sum(0)
    weights = 1.0 / ((onehot * counts).sum(-1) * (counts > 0).sum())
    return (weights * _ice_terms(logits, is_label)).sum()


@register_loss("klu")
def kl_from_uniform(logits, labels=None):
    """KLU = KL(u ‖ p) = −log C − (1/C)·Σ_i log p_i with u uniform (paper Eq. 13). Needs no labels.
    Gradient w.r.t. z: p − u (Eq. 14); it vanishes as p → u."""
    num_classes = logits.shape[-1]
    return (-math.log(num_classes) - F.log_softmax(logits, -1).mean(-1)).mean()


@register_loss("neg_ce")
def negated_cross_entropy(logits, labels):
    """−CE: the naive suppression loss whose gradient grows with the error (paper §4.3.1); diverges."""
    return -F.cross_entropy(logits, labels)


@register_loss("mse")
def noise_mse(predicted_noise, noise):
    """Noise-prediction MSE ‖ε_θ(x_t, t) − ε‖² (diffusion training loss)."""
    return F.mse_loss(predicted_noise, noise)


@register_loss("dos")
def denial_of_service(predicted_noise, noise=None):
    """DoS = ‖ε_θ(x_t, t)‖² (paper Eq. 16): push the predicted noise to zero; gradient 2ε_θ vanishes there."""
    return predicted_noise.pow(2).mean()


@register_loss("neg_mse")
def negated_noise_mse(predicted_noise, noise):
    """−MSE: the naive diffusion suppression loss (paper Eq. 15), unstable by design."""
    return -F.mse_loss(predicted_noise, noise)


@register_loss("inverse_noise")
def inverse_noise(predicted_noise, noise):
    """‖ε_θ(x_t, t) + ε‖²: predict the negated noise, the diffusion analogue of ICE (a wrong target, bounded
    below, gradient vanishing there). At its minimum the noise-prediction MSE is 4, above a random model's."""
    return (predicted_noise + noise).pow(2).mean()


# --- suppression at depth (not a registry loss: it takes a model's stage features, not its output) ------------

MMD_BANDWIDTHS = (0.5, 1.0, 2.0)  # × 2d, the mean squared distance of two d-dimensional standard Gaussian draws


def pooled_features(features: torch.Tensor, max_dims: int = 256) -> torch.Tensor:
    """N×d features of one stage, d ≤ `max_dims` (when the channels allow): a C×H×W map is average-pooled to the
    largest s×s grid with C·s² ≤ max_dims (1×1 when C > max_dims), then flattened; a flat vector longer than
    max_dims is average-pooled along its length. Float32, or float64 for a float64 input."""
    x = features if features.dtype == torch.float64 else features.float()
    if x.ndim == 4:
        channels, height, width = x.shape[1:]
        side = max(1, math.isqrt(max_dims // channels)) if channels <= max_dims else 1
        x = F.adaptive_avg_pool2d(x, (min(side, height), min(side, width)))
    x = x.reshape(len(x), -1)
    if x.shape[1] > max_dims:
        x = F.adaptive_avg_pool1d(x.unsqueeze(1), max_dims).squeeze(1)
    return x


def gaussian_mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] = MMD_BANDWIDTHS) -> torch.Tensor:
    """Unbiased MMD² between samples x (N×d) and y (M×d), N, M ≥ 2, with the kernel
    k(a, b) = (1/|S|)·Σ_{s∈S} exp(−‖a − b‖² / (s·2d)), S = `bandwidths`:
        MMD²_u = mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2·mean_{i,j} k(x_i, y_j).
    Its expectation is 0 when x and y come from one distribution (so an estimate can be slightly negative)."""
    d = x.shape[1]
    z = torch.cat([x, y])
    norms = z.pow(2).sum(1)
    sq = (norms[:, None] + norms[None, :] - 2 * z @ z.T).clamp_min(0)  # no sqrt: smooth at a zero distance
    k = sum(torch.exp(-sq / (s * 2 * d)) for s in bandwidths) / len(bandwidths)
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean())


def mmd_to_noise(features, generator: torch.Generator, max_dims: int = 256) -> torch.Tensor:
    """Suppression at depth (representation noising, Rosati et al. 2024): for each stage's features h (N×…) of
    restricted inputs, x = pooled_features(h) (N×d, at most `max_dims` dims) and ε an equal-size batch of standard
    Gaussian noise N(0, I_d) drawn from `generator` (on the CPU, then moved to x's device), the loss is
        (1/L)·Σ_stages MMD²_u(x, ε),
    `gaussian_mmd2` with fixed bandwidths s·2d, s ∈ {0.5, 1, 2} (2d is the noise's own mean squared pairwise
    distance; fixed rather than a median heuristic so the loss is a smooth function of the features and its
    gradient is exact). Minimising it makes every stage's features of restricted inputs indistinguishable from
    noise under the kernel. `features`: one tensor or a list of them (one per stage)."""
    if isinstance(features, torch.Tensor):
        features = [features]
    if not features:
        raise ValueError("mmd_to_noise: no stage features")
    total = 0.0
    for h in features:
        x = pooled_features(h, max_dims)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        total = total + gaussian_mmd2(x, noise)
    return total / len(features)


PROBE_RIDGE = 1.0  # the probe's ridge on standardised features (kernel scaled by 1/d): scale-free


def probe_readout(features, labels: torch.Tensor, ridge: float = PROBE_RIDGE, max_dims: int = 256) -> torch.Tensor:
    """Suppression at depth by information, not by distribution (the probe penalty of self-destructing models,
    Henderson et al. 2023): how much of the restricted labels a linear probe reads from each stage's features.
    For each stage, x = pooled_features(h) standardised over the batch (per dimension, so shrinking the weights
    hides nothing), the batch split in halves A and B, Y the one-hot labels. A ridge probe fitted on A (kernel form,
    K = Z Zᵀ/d):  Ŷ_B = ȳ_A + K_BA (K_AA + ridge·I)⁻¹ (Y_A − ȳ_A), and its held-out fit
        R²_{A→B} = 1 − ‖Y_B − Ŷ_B‖² / ‖Y_B − ȳ_A‖²;
    the stage's value is max(0, mean(R²_{A→B}, R²_{B→A})) (a probe no better than the mean reads nothing), the
    loss the mean over stages. Minimising it leaves no stage from which a linear probe predicts the restricted
    labels. Needs a batch of ≥ 4; a class absent from the batch adds nothing (its one-hot column is 0 throughout).
    `features`: one tensor or a list of them (one per stage)."""
    if isinstance(features, torch.Tensor):
        features = [features]
    if not features:
        raise ValueError("probe_readout: no stage features")
    if len(labels) < 4:
        raise ValueError(f"probe_readout: a batch of {len(labels)}; the cross-fitted probe needs at least 4")
    half = len(labels) // 2
    total = 0.0
    for h in features:
        x = pooled_features(h, max_dims)
        var = x.var(0, unbiased=False)
        z = (x - x.mean(0)) / (var + 1e-5 * var.mean() + 1e-12).sqrt()  # a relative floor: scale-free
        y = F.one_hot(labels.to(x.device).long()).to(z.dtype)
        parts = ((z[:half], y[:half]), (z[half:], y[half:]))
        fits = [_ridge_r2(*parts[0], *parts[1], ridge), _ridge_r2(*parts[1], *parts[0], ridge)]
        total = total + ((fits[0] + fits[1]) / 2).clamp_min(0)
    return total / len(features)


def _ridge_r2(z_fit, y_fit, z_test, y_test, ridge: float) -> torch.Tensor:
    """Held-out R² of a kernel ridge probe fitted on (z_fit, y_fit) and scored on (z_test, y_test)."""
    d = z_fit.shape[1]
    mean = y_fit.mean(0)
    kernel = z_fit @ z_fit.T / d + ridge * torch.eye(len(z_fit), dtype=z_fit.dtype, device=z_fit.device)
    predicted = mean + (z_test @ z_fit.T / d) @ torch.linalg.solve(kernel, y_fit - mean)
    return 1 - (y_test - predicted).pow(2).sum() / (y_test - mean).pow(2).sum().clamp_min(1e-12)
