"""Fine-tuning simulation (paper §4.1): run an adversary's fine-tune functionally and collect the
first-order gradient of the aggregated suppression loss (Eq. 4–5).

The model module is never copied: adapted weights live in a dict of tensors that real torch.optim
optimisers update, and `torch.func.functional_call` runs the module with them. BatchNorm running
statistics are cloned into that dict too, so the simulation never touches the model's own buffers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch.func import functional_call

from sophon.data import ImageSet
from sophon.objectives import Objective
from sophon.optim import make_optimizer
from sophon.train import endless_batches


@dataclass(frozen=True)
class SimulatedTask:
    """One sampled fine-tuning environment: strategy (start, optimiser, lr, batch size)."""

    start: str  # "direct" or "initFC"
    optimizer: str
    lr: float
    batch_size: int


def sample_task(space: dict, rng: random.Random) -> SimulatedTask:
    """Draw a task from the configured sets; `lr_scale` multiplies lrs per optimiser (SGD needs larger ones)."""
    optimizer = rng.choice(space["optimizers"])
    scale = space.get("lr_scale", {}).get(optimizer, 1.0)
    return SimulatedTask(start=rng.choice(space["starts"]), optimizer=optimizer,
                         lr=rng.choice(space["lrs"]) * scale, batch_size=rng.choice(space["batch_sizes"]))


@dataclass
class SimulationResult:
    grads: dict[str, torch.Tensor]  # mean first-order gradient of the suppression loss, by parameter name
    suppression_loss: float  # mean over the evaluation points
    final_suppression_loss: float  # after the last inner step


def simulate_finetune(model: torch.nn.Module, objective: Objective, task: SimulatedTask, finetune_data: ImageSet,
                      eval_data: ImageSet, *, steps: int, eval_every: int, eval_batch_size: int,
                      generator: torch.Generator) -> SimulationResult:
    """K = `steps` inner steps; the suppression loss is evaluated on held-out restricted data before the
    first step, every `eval_every` steps and after the last, each with the adapted weights (uniform weights)."""
    params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    frozen_out: set[str] = set()
    if task.start == "initFC":
        for name, value in objective.fresh_head(model).items():
            params[name] = value.clone().requires_grad_(True)
            frozen_out.add(name)  # a fresh head's gradient says nothing about the released head

    def forward(*args):
        return functional_call(model, (params, buffers), args)

    optimizer = make_optimizer(task.optimizer, list(params.values()), task.lr)
    targets = [name for name in params if name not in frozen_out]
    grads = {name: torch.zeros_like(params[name]) for name in targets}
    train_batches = endless_batches(finetune_data, task.batch_size, generator)
    eval_batches = endless_batches(eval_data, eval_batch_size, generator)
    losses = []
    model.train()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            images, labels = next(eval_batches)
            loss = objective.suppression_loss(forward, images, labels, generator)
            for name, grad in zip(targets, torch.autograd.grad(loss, [params[n] for n in targets])):
                grads[name] += grad
            losses.append(loss.item())
        if step == steps:
            break
        images, labels = next(train_batches)
        loss = objective.finetune_loss(forward, images, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return SimulationResult({n: g / len(losses) for n, g in grads.items()}, sum(losses) / len(losses), losses[-1])
