"""Linear-mode connectivity between the released and the original weights (issue: out of the basin).

Relearning resistance tracks how far a protected model sits from the original model's basin on the restricted task
(reference-facts: distance and linear-mode connectivity). `linear_path` evaluates a loss at
θ(α) = (1 − α)·θ_released + α·θ_original for α on a grid; `barrier` is the largest rise of the loss above the chord
between the two ends (Neyshabur et al. 2020): about 0 or below when the two weights sit in one basin of that loss (a
convex loss is never above its chord), large when a ridge separates them. Floating-point buffers (BatchNorm running
statistics) are interpolated with the weights; integer buffers are taken from the first end.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call

from sophon.data import ImageSet


def interpolate(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], alpha: float) -> dict:
    """(1 − α)·first + α·second for every floating-point tensor of two state dicts with the same keys."""
    if first.keys() != second.keys():
        raise ValueError("interpolate: the two state dicts have different keys")
    return {name: (1 - alpha) * a + alpha * second[name] if a.is_floating_point() else a
            for name, a in first.items()}


def linear_path(model: torch.nn.Module, first: dict[str, torch.Tensor], second: dict[str, torch.Tensor],
                loss: Callable[[Callable], float], points: int = 11) -> dict:
    """The loss at `points` evenly spaced α in [0, 1] along first → second. `loss(forward)` gets a forward
    function over the interpolated weights (the model's own stay untouched) and returns a number."""
    alphas = torch.linspace(0, 1, points).tolist()
    was_training = model.training
    model.eval()
    losses = []
    try:
        for alpha in alphas:
            weights = interpolate(first, second, alpha)
            losses.append(float(loss(lambda *args: functional_call(model, weights, args))))
    finally:
        model.train(was_training)
    return {"alphas": alphas, "losses": losses, "barrier": barrier(alphas, losses)}


def barrier(alphas: list[float], losses: list[float]) -> float:
    """max over α of loss(α) − ((1 − α)·loss(0) + α·loss(1))."""
    first, last = losses[0], losses[-1]
    return max(value - ((1 - a) * first + a * last) for a, value in zip(alphas, losses))


def distance(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict:
    """‖θ_first − θ_second‖ over the floating-point tensors, absolute and relative to ‖θ_second‖."""
    diff = sum(float((a.double() - second[n].double()).pow(2).sum()) for n, a in first.items() if a.is_floating_point())
    norm = sum(float(b.double().pow(2).sum()) for b in second.values() if b.is_floating_point())
    return {"l2": diff ** 0.5, "relative": (diff / norm) ** 0.5 if norm else float("nan")}


def dataset_loss(objective, data: ImageSet, *, batch_size: int = 256, max_samples: int = 512, seed: int = 0):
    """A `loss(forward)` for `linear_path`: the objective's fine-tuning loss (cross-entropy; a diffusion model's
    denoising MSE) averaged over the first `max_samples` images, with the same noise and timesteps at every α."""
    data = data.subset(torch.arange(min(len(data), max_samples)))

    def loss(forward) -> float:
        generator = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        with torch.no_grad():
            for begin in range(0, len(data), batch_size):
                images, labels = data.images[begin:begin + batch_size], data.labels[begin:begin + batch_size]
                total += float(objective.finetune_loss(forward, images, labels, generator)) * len(images)
                count += len(images)
        return total / count

    return loss


def connectivity(model: torch.nn.Module, original: dict[str, torch.Tensor], objective, restricted: ImageSet,
                 original_data: ImageSet, points: int = 11) -> dict:
    """The released model (`model`'s weights) against the original weights: the loss path on the restricted and on
    the original domain, and the distance between them."""
    released = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return {"restricted": linear_path(model, released, original, dataset_loss(objective, restricted), points),
            "original": linear_path(model, released, original, dataset_loss(objective, original_data), points),
            "distance": distance(released, original)}
