"""The adversary: fine-tuning attacks, by name from a registry so red-teamers can add their own.

An attack takes a starting model, the task's objective, the adversary's half of the restricted data and the
restricted test set, and returns the objective's quality (accuracy for classifiers, fixed-noise MSE for
diffusion) after every epoch, epoch 0 (before any update) included. One loop serves both tasks: the strategy
(sophon.strategies) prepares the start, the objective supplies the loss and the quality measure.

`AttackSettings` beyond optimiser, lr, batch size, weight decay, epochs and schedule (all off by default, so the
plain run is unchanged): the recipe — `warmup_epochs` (cosine's linear warm-up; 0 = 5 % of the steps),
`label_smoothing` (classification only), `clip_norm` (global gradient norm), `shift`/`shift_prob` (seeded random
translations of a share of the batches) — and the preparations of the start — `shrink`/`perturb`
(shrink-and-perturb of the trained, not re-initialised parameters) and `recalibrate_bn` (BatchNorm statistics
re-estimated on the adversary's data). A registered attack receives the settings and may honour them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from sophon.data import ImageSet
from sophon.errors import ConfigError, unknown
from sophon.optim import make_optimizer, make_schedule
from sophon.train import random_shift, train_epochs


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
    # The recipe (sophon.train.train_epochs, sophon.optim.make_schedule); the defaults are the plain run.
    warmup_epochs: float = 0.0  # schedule "cosine": linear warm-up over this many epochs; 0 keeps 5 % of the steps
    label_smoothing: float = 0.0  # classification cross-entropy label smoothing (diffusion: must stay 0)
    clip_norm: float = 0.0  # gradient-norm clipping of the trainable parameters; 0 = none
    shift: int = 0  # random translations of up to ±shift pixels (reflect padding), per image
    shift_prob: float = 0.5  # share of batches that get the random shift when shift > 0
    # Preparations of the start (sophon.strategies), after the strategy, never from scratch.
    recalibrate_bn: bool = False  # BatchNorm running statistics re-estimated on the adversary's data
    shrink: float = 1.0  # shrink-and-perturb (Ash & Adams 2020): θ ← shrink·θ + perturb·θ_fresh on the
    perturb: float = 0.0  # trained, not re-initialised parameters; θ_fresh a seeded fresh init; 1.0/0.0 = off

    def __post_init__(self):
        checks = {"warmup_epochs": self.warmup_epochs >= 0, "label_smoothing": 0 <= self.label_smoothing <= 1,
                  "clip_norm": self.clip_norm >= 0, "shift": isinstance(self.shift, int) and self.shift >= 0,
                  "shift_prob": 0 <= self.shift_prob <= 1, "shrink": self.shrink >= 0, "perturb": self.perturb >= 0}
        allowed = {"warmup_epochs": ">= 0", "label_smoothing": "in [0, 1]", "clip_norm": ">= 0 (0: off)",
                   "shift": "an integer >= 0", "shift_prob": "in [0, 1]", "shrink": ">= 0", "perturb": ">= 0"}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"attack setting {key} = {getattr(self, key)!r}: must be {allowed[key]}")


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
    every weight of the randomly initialised model is trained, the strategy and BatchNorm recalibration do not
    apply, and shrink-and-perturb sets the init scale (a seeded second init as the perturbation). Otherwise:
    strategy → shrink-and-perturb → BatchNorm recalibration (sophon.strategies), then the optimiser. The recipe
    knobs (warm-up, label smoothing, clipping, shift) apply in both cases; at their defaults the run takes exactly
    the plain path (no clipping call, no extra random draws)."""
    from sophon.objectives import ClassificationObjective
    from sophon.strategies import prepare, recalibrate_batchnorm, shrink_perturb, shrinkable

    if objective is None:
        objective = ClassificationObjective(device=device)
    loss = objective.finetune_loss
    if settings.label_smoothing > 0:
        if not isinstance(objective, ClassificationObjective):
            raise ConfigError(f"attack setting label_smoothing = {settings.label_smoothing}: label smoothing applies "
                              f"to classification cross-entropy only, not to a {type(objective).__name__}; use 0")
        loss = functools.partial(objective.finetune_loss, label_smoothing=settings.label_smoothing)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if from_scratch:
        for p in model.parameters():
            p.requires_grad_(True)
        net, trainable = model, list(model.parameters())
        # Shrink-and-perturb of a fresh model is an init scale: shrink·θ_init + perturb·θ_fresh (a second init).
        shrink_perturb(net, [name for name, _ in net.named_parameters()], settings.shrink, settings.perturb,
                       seed=seed + 1)
    else:
        prepared = prepare(model, settings.strategy, seed=seed, lora_rank=settings.lora_rank)
        shrink_perturb(prepared.model, shrinkable(prepared), settings.shrink, settings.perturb, seed=seed)
        net, trainable = prepared.model.to(device), prepared.trainable
        if settings.recalibrate_bn:
            recalibrate_batchnorm(net, adversary, batch_size=settings.batch_size, device=device)
    optimizer = make_optimizer(settings.optimizer, trainable, settings.lr, settings.weight_decay)
    steps_per_epoch = -(-len(adversary) // settings.batch_size)
    warmup = max(1, round(settings.warmup_epochs * steps_per_epoch)) if settings.warmup_epochs > 0 else 0
    scheduler = make_schedule(settings.schedule, optimizer, settings.epochs * steps_per_epoch, warmup_steps=warmup)

    curve = [objective.quality(net, test, device)]
    if on_epoch:
        on_epoch(0, curve[0])

    def after_epoch(epoch: int) -> None:
        curve.append(objective.quality(net, test, device))
        if on_epoch:
            on_epoch(epoch, curve[-1])

    train_epochs(net, adversary, optimizer, epochs=settings.epochs, batch_size=settings.batch_size,
                 generator=generator, device=device, scheduler=scheduler, on_epoch=after_epoch, loss=loss,
                 desc="attack", transform=random_shift(settings.shift, settings.shift_prob) if settings.shift else None,
                 clip_norm=settings.clip_norm)
    return curve


def sweep_score(curve: list[float]) -> float:
    """How well a fine-tune did: mean restricted accuracy over epochs 1..E (rewards both speed and end point)."""
    return sum(curve[1:]) / max(1, len(curve) - 1)


def best_lr(curves: dict[float, list[float]]) -> float:
    """The sweep's learning rate at which fine-tuning the original model did best."""
    return max(curves, key=lambda lr: sweep_score(curves[lr]))
