"""Non-transferable learning baseline (B3; Wang et al., ICLR 2022, as ported by NTLBench).

loss = KL_src − min(1, α·KL_tgt) · min(1, β·MMD(f_src, f_tgt)), where KL_* is the KL divergence between
the one-hot labels and the predictions (= cross-entropy) and f are pre-logit features. Trained from the
original model on the defender's half of the restricted domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sophon.data import ImageSet
from sophon.train import endless_batches, progress, to_input


@dataclass
class NTLSettings:
    steps: int = 300
    lr: float = 1e-4
    alpha: float = 0.1
    beta: float = 0.1
    batch_size: int = 64


@dataclass
class NTLHistory:
    loss: list[float] = field(default_factory=list)
    kl_source: list[float] = field(default_factory=list)
    kl_target: list[float] = field(default_factory=list)
    mmd: list[float] = field(default_factory=list)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.5, 1.0, 2.0, 4.0, 8.0)) -> torch.Tensor:
    """Biased MMD² estimate with a sum of Gaussian kernels, bandwidths relative to the mean squared distance."""
    joint = torch.cat([x, y])
    distances = torch.cdist(joint, joint).pow(2)
    scale = distances.detach().mean().clamp_min(1e-8)
    kernel = sum(torch.exp(-distances / (scale * b)) for b in bandwidths)
    n = len(x)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def train_ntl(model, source: ImageSet, target: ImageSet, settings: NTLSettings, *, seed: int,
              device: torch.device) -> NTLHistory:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    source_batches = endless_batches(source, settings.batch_size, generator)
    target_batches = endless_batches(target, settings.batch_size, generator)
    history = NTLHistory()
    model.train()
    bar = progress(range(settings.steps), desc="ntl", unit="step")
    for _ in bar:
        (xs, ys), (xt, yt) = next(source_batches), next(target_batches)
        xs, xt = to_input(xs, device), to_input(xt, device)
        features = model.features(torch.cat([xs, xt]))
        logits = model.net.get_classifier()(features)
        n = len(xs)
        kl_source = F.cross_entropy(logits[:n], ys.to(device))
        kl_target = F.cross_entropy(logits[n:], yt.to(device))
        mmd = gaussian_mmd(features[:n], features[n:])
        loss = kl_source - torch.clamp(settings.alpha * kl_target, max=1) * torch.clamp(settings.beta * mmd, max=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in (("loss", loss), ("kl_source", kl_source), ("kl_target", kl_target), ("mmd", mmd)):
            getattr(history, key).append(value.item())
        bar.set_postfix(src=f"{kl_source.item():.3f}", tgt=f"{kl_target.item():.3f}")
    return history
