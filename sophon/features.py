"""Every stage's output for a batch, one helper per model family (the stages are `sophon.strategies.model_stages`'s,
so a feature-level loss, the simulation's re-initialisation and the attack search mean the same modules).

- classifiers (`sophon.models.Classifier`): timm's `forward_intermediates` on the Classifier's normalised input
  (the same `_normalize` its forward applies) where every stage is a `feature_info` entry whose channel count
  `forward_intermediates` reproduces (ResNet `layer1..4`, ConvNeXt `stages.*`); otherwise (PaperVGG's slices,
  EfficientNet's expanded block lists, a net without `forward_intermediates`) forward hooks on the stages, the
  last module of a slice `a.b[i:j]` standing for it. Either way the forward stops after the last stage asked for
  (`stop_early`, or the hook ends the pass): the head is never run.
- the diffusers `UNet2DModel`: forward hooks on `down_blocks.*` (each returns its hidden states and the skip
  tensors: the hidden states are its output) and `mid_block`; the up blocks are never run.

`params` (a dict of parameters and buffers by name, e.g. the simulation's adapted weights) runs the model through
`torch.func.functional_call`, so gradients flow to those tensors and the model's own stay untouched; None runs the
model itself. Outputs come in stage order, one tensor each (batch first)."""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.func import functional_call

from sophon.errors import ConfigError
from sophon.models import Classifier

STAGE_SELECTIONS = ("all", "early", "deep")
_SLICE = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


def feature_stages(model: nn.Module, which: str = "all") -> list[str]:
    """The stages whose outputs `stage_features` returns: `all` of the model's stages (a UNet: its down blocks and
    mid block), the `early` first half or the `deep` last half (rounded up)."""
    from sophon.strategies import model_stages

    if which not in STAGE_SELECTIONS:
        raise ConfigError(f"sophon.depth.stages: {which!r} is not one of {', '.join(STAGE_SELECTIONS)}")
    names = model_stages(model)
    if _is_unet(model):
        names = [n for n in names if not n.startswith("up_blocks.")]
    half = (len(names) + 1) // 2
    return {"all": names, "early": names[:half], "deep": names[-half:]}[which]


def stage_features(model: nn.Module, inputs: tuple, params: dict[str, torch.Tensor] | None = None,
                   stages: list[str] | None = None) -> list[torch.Tensor]:
    """The outputs of `stages` (default `feature_stages(model)`) for `inputs` (the model's positional arguments:
    `(x,)` for a classifier, `(x_t, t)` for a UNet), with `params` if given (see the module docstring)."""
    stages = feature_stages(model) if stages is None else stages
    if _is_unet(model):
        return _unet_features(model, inputs, params, stages)
    if isinstance(model, Classifier):
        return _classifier_features(model, inputs, params, stages)
    raise TypeError(f"no stage features for a {type(model).__name__}: expected a sophon Classifier or a UNet2DModel")


def _is_unet(model: nn.Module) -> bool:
    return not isinstance(model, Classifier) and hasattr(model, "down_blocks") and hasattr(model, "mid_block")


class _Stop(Exception):
    """Raised by the hook of the last stage asked for: the rest of the forward pass is not needed."""


class _Intermediates(nn.Module):
    """Runs a Classifier's timm net through `forward_intermediates`, so `functional_call` can swap its weights."""

    def __init__(self, model: Classifier, indices: list[int]):
        super().__init__()
        self.model, self.indices = model, indices

    def forward(self, x):
        return self.model.net.forward_intermediates(self.model._normalize(x), indices=self.indices,
                                                    intermediates_only=True, stop_early=True)


def _intermediate_indices(model: Classifier, stages: list[str]) -> list[int] | None:
    """feature_info positions of `stages` if `forward_intermediates` can give them all, else None (hooks)."""
    net = model.net
    info = getattr(net, "feature_info", None)
    if not info or not callable(getattr(net, "forward_intermediates", None)):
        return None
    listed = ["net." + entry["module"] for entry in info]
    if not all(name in listed for name in stages):
        return None
    return [listed.index(name) for name in stages]


def _classifier_features(model: Classifier, inputs, params, stages):
    indices = _intermediate_indices(model, stages)
    if indices is not None:
        if params is None:
            out = _Intermediates(model, indices)(*inputs)
        else:
            out = functional_call(_Intermediates(model, indices), {f"model.{k}": v for k, v in params.items()},
                                  inputs)
        channels = [model.net.feature_info[i]["num_chs"] for i in indices]
        if len(out) == len(stages) and [o.shape[1] for o in out] == channels:
            return list(out)
        # forward_intermediates indexes something else than feature_info for this net: hooks are exact.
    return _hooked(model, inputs, params, [_stage_module(model, name) for name in stages], lambda out: out)


def _unet_features(model, inputs, params, stages):
    # A down block returns (hidden states, skip tensors); the mid block its hidden states.
    return _hooked(model, inputs, params, [model.get_submodule(name) for name in stages],
                   lambda out: out[0] if isinstance(out, tuple) else out)


def _stage_module(model: nn.Module, name: str) -> nn.Module:
    sliced = _SLICE.match(name)
    if sliced:  # a slice of an nn.Sequential: its last layer's output is the slice's output
        return model.get_submodule(sliced[1])[int(sliced[3]) - 1]
    return model.get_submodule(name)


def _hooked(model, inputs, params, modules, output_of):
    """One forward pass with a hook on each module, stopped after the last of them has run."""
    found: dict[int, torch.Tensor] = {}
    order = {id(m): i for i, m in enumerate(modules)}
    if len(order) != len(modules):
        raise ValueError("stage_features: a module stands for two stages")

    def hook(module, args, out):
        found[order[id(module)]] = output_of(out)
        if len(found) == len(modules):
            raise _Stop

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        if params is None:
            model(*inputs)
        else:
            functional_call(model, params, inputs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(modules)) if i not in found]
    if missing:
        raise RuntimeError(f"stage_features: {len(missing)} stages did not run in the forward pass")
    return [found[i] for i in range(len(modules))]


@torch.no_grad()
def stage_readout(model: nn.Module, data, device: torch.device, *, batch_size: int = 128, batches: int = 4,
                  seed: int = 0) -> list[float]:
    """What a linear probe reads of `data`'s labels from each stage of a classifier (sophon.losses.probe_readout,
    per stage), the mean over `batches` seeded random batches of `batch_size`, in eval mode (running statistics).
    0 reads nothing; a random init already reads some (random features of images separate classes). Fewer samples
    than a batch: one batch of all of them."""
    from sophon.losses import probe_readout
    from sophon.train import to_input

    was_training = model.training
    model.eval()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    batch_size = min(batch_size, len(data))
    stages = feature_stages(model)
    totals = [0.0] * len(stages)
    count = 0
    try:
        for start in range(0, min(len(order), batches * batch_size) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            features = stage_features(model, (to_input(data.images[index], device),), None, stages)
            for i, h in enumerate(features):
                totals[i] += float(probe_readout(h, data.labels[index]))
            count += 1
    finally:
        model.train(was_training)
    return [t / count for t in totals]
