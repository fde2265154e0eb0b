"""The adversary: fine-tuning attacks, by name from a registry so red-teamers can add their own.

An attack takes a starting model (None means train from scratch), the adversary's half of the
restricted data and the restricted test set, and returns the test metric after every epoch,
epoch 0 (before any update) included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sophon.data import ImageSet
from sophon.errors import unknown
from sophon.models import head_parameter_names, reset_head
from sophon.optim import make_optimizer
from sophon.train import evaluate_accuracy, train_epochs

STARTS = ("direct", "initFC")
TRAINED = ("all", "FC")


@dataclass(frozen=True)
class AttackSettings:
    method: str = "finetune"
    strategy: str = "direct+all"  # "<start>+<trained>": direct|initFC + all|FC
    optimizer: str = "momentum"
    lr: float = 0.01
    batch_size: int = 200
    weight_decay: float = 5e-4
    epochs: int = 20

    @property
    def start(self) -> str:
        return self.strategy.split("+")[0]

    @property
    def trained(self) -> str:
        return self.strategy.split("+")[1]


AttackFn = Callable[..., list[float]]
ATTACKS: dict[str, AttackFn] = {}


def register_attack(name: str):
    def wrap(fn: AttackFn) -> AttackFn:
        ATTACKS[name] = fn
        return fn

    return wrap


def get_attack(name: str) -> AttackFn:
    if name not in ATTACKS:
        raise unknown("attack method", name, ATTACKS)
    return ATTACKS[name]


@register_attack("finetune")
def finetune(model: torch.nn.Module, adversary: ImageSet, test: ImageSet, settings: AttackSettings, *,
             seed: int, device: torch.device, from_scratch: bool = False,
             on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Supervised fine-tuning with the paper's strategies (Table I). From scratch, every weight is trained."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initFC head's initial weights
    if settings.start == "initFC" and not from_scratch:
        reset_head(model)
    trained_names = head_parameter_names(model) if settings.trained == "FC" and not from_scratch else None
    for name, p in model.named_parameters():
        p.requires_grad_(trained_names is None or name in trained_names)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(settings.optimizer, params, settings.lr, settings.weight_decay)

    accuracies = [evaluate_accuracy(model, test, device)]
    if on_epoch:
        on_epoch(0, accuracies[0])

    def after_epoch(epoch: int) -> None:
        accuracies.append(evaluate_accuracy(model, test, device))
        if on_epoch:
            on_epoch(epoch, accuracies[-1])

    train_epochs(model, adversary, optimizer, epochs=settings.epochs, batch_size=settings.batch_size,
                 generator=generator, device=device, on_epoch=after_epoch, desc="attack")
    return accuracies


def sweep_score(curve: list[float]) -> float:
    """How well a fine-tune did: mean restricted accuracy over epochs 1..E (rewards both speed and end point)."""
    return sum(curve[1:]) / max(1, len(curve) - 1)


def best_lr(curves: dict[float, list[float]]) -> float:
    """The sweep's learning rate at which fine-tuning the original model did best."""
    return max(curves, key=lambda lr: sweep_score(curves[lr]))
