"""What a model is trained, fine-tuned, suppressed and judged on, per task family.

One fine-tuning simulation (sophon.simulate) and one protect loop (sophon.protect) serve classification
and diffusion alike; an objective supplies the losses and the quality measure.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from sophon.data import ImageSet
from sophon.losses import get_loss
from sophon.train import evaluate_accuracy, to_input

Forward = Callable[..., torch.Tensor]


class Objective(Protocol):
    higher_is_better: bool
    losses_draw: bool  # whether finetune_loss/suppression_loss draw from the generator (absent: assumed True)

    def finetune_loss(self, forward: Forward, images, labels, generator) -> torch.Tensor: ...

    def suppression_loss(self, forward: Forward, images, labels, generator) -> torch.Tensor: ...

    def quality(self, model, data: ImageSet, device) -> float: ...

    def model_inputs(self, images, generator) -> tuple: ...  # the model's arguments for a batch (stage features)


class ClassificationObjective:
    """Cross-entropy for fine-tuning and reinforcement; ICE or KLU (or −CE) for suppression; accuracy."""

    higher_is_better = True
    losses_draw = False  # its losses draw no random numbers: adversaries can run batched (sophon.simulate)

    def __init__(self, suppression: str = "ice", device: torch.device | None = None):
        self.suppress = get_loss(suppression)
        self.device = device or torch.device("cpu")

    def finetune_loss(self, forward, images, labels, generator, *, label_smoothing: float = 0.0):
        """Cross-entropy; `label_smoothing` (the attacker's knob, sophon.attacks) mixes the one-hot targets with
        the uniform distribution (torch's `F.cross_entropy(..., label_smoothing=)`; 0 is plain cross-entropy)."""
        return F.cross_entropy(forward(to_input(images, self.device)), labels.to(self.device),
                               label_smoothing=label_smoothing)

    def suppression_loss(self, forward, images, labels, generator):
        return self.suppress(forward(to_input(images, self.device)), labels.to(self.device))

    def quality(self, model, data, device):
        return evaluate_accuracy(model, data, device)

    def model_inputs(self, images, generator):
        """The classifier's argument for a uint8 batch: `(x,)`, x in [0, 1] (the Classifier normalises it)."""
        return (to_input(images, self.device),)
