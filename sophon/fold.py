"""K copies of a network as one network of K times the channels ("folding"), for running several simulated adversaries
at once (sophon.simulate.AdversaryBatch).

Copy k of every channel lives at channels [k·C, (k+1)·C): a convolution of `groups` g becomes one of K·g groups, a
batch norm of C channels one of K·C (its statistics per copy and channel, as before), a linear layer a batched matrix
product, and parameter-free per-channel layers (activations, pooling, flatten, residual sums) run unchanged. The
folded network's tensors are views of the stacked [K, ...] tensors (`fold_tensors`), so gradients reach each copy's
slice and batch-norm statistics update in place. A network with anything else (a layer that mixes channels, such as
LayerNorm or attention) is not foldable (`foldable` is False); a forward pass that mixes channels in its own code is
caught by AdversaryBatch's check of the folded forward against the network's own.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.Identity,
               nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)
FOLDED = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


class GroupedLinear(nn.Module):
    """K linear layers on [B, K·in] inputs: copy k maps features [k·in, (k+1)·in) to outputs [k·out, (k+1)·out)."""

    def __init__(self, copies: int, linear: nn.Linear):
        super().__init__()
        self.copies = copies
        out, width = linear.weight.shape
        self.weight = nn.Parameter(torch.empty(copies * out, width, device="meta"))
        self.bias = None if linear.bias is None else nn.Parameter(torch.empty(copies * out, device="meta"))

    def forward(self, x):
        k = self.copies
        w = self.weight.view(k, -1, self.weight.shape[-1])  # [K, out, in]
        y = torch.bmm(x.view(x.shape[0], k, -1).transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)  # [B, K, out]
        y = y.reshape(x.shape[0], -1)
        return y if self.bias is None else y + self.bias


def fold_plan(model: nn.Module) -> dict[str, str] | None:
    """How each parameter and buffer folds, by name: `first` ([K, d0, ...] → [K·d0, ...]: a convolution's, batch
    norm's or linear layer's), `channel` ([K, 1, C, ...] → [1, K·C, ...]: a broadcast buffer of a container, such as
    an input normalisation), `count` (a 0-dim batch count: copy 0's); None where the network is not foldable: a leaf
    module that is neither folded nor per-channel, a batch norm with a cumulative average (it needs each copy's own
    count), or a container's tensor of another shape."""
    plan = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        leaf = next(module.children(), None) is None
        if isinstance(module, nn.BatchNorm2d) and module.momentum is None:
            return None
        if isinstance(module, FOLDED):
            rule = "first"
        elif leaf and not isinstance(module, PER_CHANNEL):
            return None
        else:
            rule = "channel"  # a container's own tensors: only broadcast [1, C, ...] buffers fold
        for name, tensor in own:
            full = f"{prefix}.{name}" if prefix else name
            if tensor.dim() == 0:
                plan[full] = "count"
            elif rule == "channel" and not (tensor.dim() >= 2 and tensor.shape[0] == 1):
                return None
            else:
                plan[full] = rule
    return plan


def foldable(model: nn.Module) -> bool:
    """Whether `fold_model` can fold `model` (`fold_plan`); a forward pass that mixes channels in a container's own
    code is caught by running it (AdversaryBatch)."""
    return fold_plan(model) is not None


def fold_model(model: nn.Module, copies: int) -> nn.Module:
    """A copy of `model` whose layers take K = `copies` times the channels (module docstring). Its own tensors are on
    the meta device (no memory): it runs with `torch.func.functional_call` and `fold_tensors`."""
    folded = copy.deepcopy(model).to("meta")
    for name, module in list(folded.named_modules()):
        if isinstance(module, nn.Conv2d):
            new = nn.Conv2d(module.in_channels * copies, module.out_channels * copies, module.kernel_size,
                            module.stride, module.padding, module.dilation, module.groups * copies,
                            module.bias is not None, module.padding_mode, device="meta")
        elif isinstance(module, nn.BatchNorm2d):
            new = nn.BatchNorm2d(module.num_features * copies, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, device="meta")
        elif isinstance(module, nn.Linear):
            new = GroupedLinear(copies, module)
        else:
            continue
        new.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, child, new)
    return folded


def fold_tensors(stacked: dict[str, torch.Tensor], plan: dict[str, str]) -> dict[str, torch.Tensor]:
    """The folded network's tensors from the stacked [K, ...] ones by `fold_plan`: views where the layout allows
    (always for batch-norm statistics, which update in place), so gradients reach each copy's slice."""
    out = {}
    for name, s in stacked.items():
        rule = plan[name]
        if rule == "count":
            out[name] = s[0]
        elif rule == "channel":
            out[name] = s.reshape(1, s.shape[0] * s.shape[2], *s.shape[3:])
        else:
            out[name] = s.reshape(s.shape[0] * s.shape[1], *s.shape[2:])
    return out
