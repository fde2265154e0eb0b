"""Supervised training and evaluation on in-memory uint8 image tensors (shared by every stage)."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sophon.data import ImageSet


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU; nothing else in the core assumes CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable=None, **kwargs):
    """tqdm, quiet under CI or when SOPHON_PROGRESS=0."""
    disable = os.environ.get("SOPHON_PROGRESS", "1") == "0" or os.environ.get("CI") == "true"
    return tqdm(iterable, disable=disable, dynamic_ncols=True, mininterval=1.0, **kwargs)


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 → float in [0, 1] on the device (models normalise internally)."""
    return images.to(device, non_blocking=True).float().div_(255)


def shift_images(images: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Every image translated by its own integer offsets (dy, dx) in [-shift, shift], drawn from `generator`
    (dy for all images, then dx); the uncovered border is filled by reflection. uint8 (N, C, H, W) in and out."""
    n, _, h, w = images.shape
    padded = F.pad(images.float(), (shift, shift, shift, shift), mode="reflect")
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)]).to(images.dtype)


def random_shift(shift: int, probability: float = 0.5) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """A batch transform for `train_epochs`: with `probability` (one draw per batch) the batch's images are
    shifted by `shift_images`; otherwise it passes unchanged."""
    if shift < 1:
        raise ValueError(f"shift must be a positive number of pixels, got {shift}")

    def transform(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if torch.rand((), generator=generator).item() >= probability:
            return images
        return shift_images(images, generator, shift)

    return transform


def batches(data: ImageSet, batch_size: int, generator: torch.Generator, *, drop_last: bool = False) -> Iterator:
    """One shuffled epoch of (uint8 images, labels) batches."""
    order = torch.randperm(len(data), generator=generator)
    stop = len(order) - (len(order) % batch_size if drop_last and len(order) > batch_size else 0)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        yield data.images[index], data.labels[index]


class BatchStream:
    """Endless shuffled full batches (an epoch's remainder dropped), a new permutation drawn from `generator` when
    an epoch runs out. Its position is state that `state()`/`restore()` save and set, so a resumed run draws the
    same batches as an uninterrupted one."""

    def __init__(self, data: ImageSet, batch_size: int, generator: torch.Generator):
        self.data, self.generator = data, generator
        self.batch_size = min(batch_size, len(data))
        self.stop = len(data) - (len(data) % self.batch_size if len(data) > self.batch_size else 0)
        self.order, self.position = None, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.order is None or self.position >= self.stop:
            self.order, self.position = torch.randperm(len(self.data), generator=self.generator), 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.data.images[index], self.data.labels[index]

    def state(self) -> dict:
        return {"order": self.order, "position": self.position}

    def restore(self, state: dict) -> None:
        self.order, self.position = state["order"], int(state["position"])


def endless_batches(data: ImageSet, batch_size: int, generator: torch.Generator) -> BatchStream:
    return BatchStream(data, batch_size, generator)


# Scoring batch: on CPU 1,000 images in one batch took 1.4-1.5x as long (medians) as in chunks of 256, with the same
# logits bit for bit in eval mode (benchmarks/attack_epoch.py).
SCORE_BATCH = 256


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, data: ImageSet, device: torch.device,
                      batch_size: int = SCORE_BATCH) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = to_input(data.images[start:start + batch_size], device)
        y = data.labels[start:start + batch_size].to(device)
        correct += (model(x).argmax(-1) == y).sum().item()
    model.train(was_training)
    return 100.0 * correct / max(1, len(data))


def train_epochs(model, data: ImageSet, optimizer, *, epochs: int, batch_size: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", scheduler=None, on_epoch: Callable[[int], None] | None = None,
                 loss: Callable | None = None, desc: str = "train",
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 clip_norm: float = 0.0) -> list[float]:
    """The one training loop: `loss(model, images, labels, generator)` per batch (cross-entropy by default;
    an objective's `finetune_loss` for diffusion); `on_epoch(k)` runs after every epoch k = 1..epochs.
    `transform(images, generator)` (e.g. `random_shift`) changes each uint8 batch before the loss; `clip_norm` > 0
    clips the global gradient norm of the optimiser's parameters to it before every step (0: no clipping, and no
    call). Neither draws from `generator` when off. Returns the mean training loss of every epoch."""
    if loss is None:
        def loss(net, images, labels, _generator):
            return F.cross_entropy(net(to_input(images, device)), labels.to(device))
    model.train()
    bar = progress(total=epochs * -(-len(data) // batch_size), desc=desc, unit="step")
    means = []
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for images, labels in batches(data, batch_size, generator):
            if transform is not None:
                images = transform(images, generator)
            value = loss(model, images, labels, generator)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if clip_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                               clip_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total, count = total + value.item(), count + 1
            bar.update(1)
        means.append(total / max(1, count))
        bar.set_postfix(epoch=epoch, loss=f"{means[-1]:.4f}")
        if on_epoch is not None:
            on_epoch(epoch)
            model.train()
    bar.close()
    return means
