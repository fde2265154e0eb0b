"""The adversary: fine-tuning attacks, by name from a registry so red-teamers can add their own.

An attack takes a starting model, the task's objective, the adversary's half of the restricted data and the
restricted test set, and returns the objective's quality (accuracy for classifiers, fixed-noise MSE for
diffusion) after every epoch, epoch 0 (before any update) included. One loop serves both tasks: the strategy
(sophon.strategies) prepares the start, the objective supplies the loss and the quality measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sophon.data import ImageSet
from sophon.errors import unknown
from sophon.optim import make_optimizer, make_schedule
from sophon.train import train_epochs


@dataclass(frozen=True)
class AttackSettings:
    method: str = "finetune"
    strategy: str = "direct+all"  # sophon.strategies: direct+all, initFC+all, initFC+FC, reinit<k>+all, lora, …
    optimizer: str = "momentum"
    lr: float = 0.01
    batch_size: int = 200
    weight_decay: float = 5e-4
    epochs: int = 20
    schedule: str = "constant"  # or "cosine": linear warm-up then cosine decay to zero (sophon.optim)
    lora_rank: int = 4


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
             seed: int, device: torch.device, from_scratch: bool = False, objective=None,
             on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Supervised fine-tuning with a strategy (paper Table I, plus re-initialised blocks and LoRA). From scratch,
    every weight of the randomly initialised model is trained and the strategy does not apply."""
    from sophon.strategies import prepare

    if objective is None:
        from sophon.objectives import ClassificationObjective

        objective = ClassificationObjective(device=device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if from_scratch:
        for p in model.parameters():
            p.requires_grad_(True)
        net, trainable = model, list(model.parameters())
    else:
        prepared = prepare(model, settings.strategy, seed=seed, lora_rank=settings.lora_rank)
        net, trainable = prepared.model.to(device), prepared.trainable
    optimizer = make_optimizer(settings.optimizer, trainable, settings.lr, settings.weight_decay)
    steps = settings.epochs * -(-len(adversary) // settings.batch_size)
    scheduler = make_schedule(settings.schedule, optimizer, steps)

    curve = [objective.quality(net, test, device)]
    if on_epoch:
        on_epoch(0, curve[0])

    def after_epoch(epoch: int) -> None:
        curve.append(objective.quality(net, test, device))
        if on_epoch:
            on_epoch(epoch, curve[-1])

    train_epochs(net, adversary, optimizer, epochs=settings.epochs, batch_size=settings.batch_size,
                 generator=generator, device=device, scheduler=scheduler, on_epoch=after_epoch,
                 loss=objective.finetune_loss, desc="attack")
    return curve


def sweep_score(curve: list[float]) -> float:
    """How well a fine-tune did: mean restricted accuracy over epochs 1..E (rewards both speed and end point)."""
    return sum(curve[1:]) / max(1, len(curve) - 1)


def best_lr(curves: dict[float, list[float]]) -> float:
    """The sweep's learning rate at which fine-tuning the original model did best."""
    return max(curves, key=lambda lr: sweep_score(curves[lr]))
