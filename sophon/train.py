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


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, data: ImageSet, device: torch.device, batch_size: int = 1000) -> float:
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
                 loss: Callable | None = None, desc: str = "train") -> list[float]:
    """The one training loop: `loss(model, images, labels, generator)` per batch (cross-entropy by default;
    an objective's `finetune_loss` for diffusion); `on_epoch(k)` runs after every epoch k = 1..epochs.
    Returns the mean training loss of every epoch."""
    if loss is None:
        def loss(net, images, labels, _generator):
            return F.cross_entropy(net(to_input(images, device)), labels.to(device))
    model.train()
    bar = progress(total=epochs * -(-len(data) // batch_size), desc=desc, unit="step")
    means = []
    for epoch in range(1, epochs + 1):
        total, count = 0.0, 0
        for images, labels in batches(data, batch_size, generator):
            value = loss(model, images, labels, generator)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
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
