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
    masked = logits.masked_fill(F.one_hot(labels, logits.shape[-1]).bool(), float("-inf"))
    return (torch.logsumexp(logits, -1) - torch.logsumexp(masked, -1)).mean()


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
