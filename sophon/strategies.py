"""The adversary's fine-tuning strategies: how an attacker prepares a starting model before fine-tuning it.

One registry serves both tasks. A strategy decides which parameters get fresh random values and which ones the
optimiser may update; `prepare` applies it in place and says exactly what it did (`Prepared`), so the attack
loop, the tests and the report agree on what "initFC+FC" or "reinit2+all" meant.

    classification (sophon.models.Classifier)     diffusion (diffusers UNet2DModel)
    direct+all      nothing new, train all        direct+all      nothing new, train all
    initFC+all      new head, train all           reinit_up+all   new last up block, train all
    initFC+FC       new head, train the head      lora            LoRA adapters, train the adapters
    reinit<k>+all   new last k stages + head, train all
    lora            LoRA adapters, train the adapters

Re-initialisation calls each submodule's own `reset_parameters()` (and `reset_running_stats()` for batch
norms) under `torch.manual_seed(seed)`, so it is reproducible and module-local: PyTorch's default init per
layer type, not an architecture's own init scheme (timm's ResNet fan-out Kaiming, zero-init last BN). The head
is reset in place, so parameter names and identities survive (`reinitialised` names are valid before and after).
A parameter whose module has no `reset_parameters()` (CAFormer's scales) keeps its value, with a warning, and
is not listed as re-initialised.

Stages (`model_stages`, input → output) per model family:
- timm models: the backbone's `feature_info` (the modules whose outputs timm exposes as feature maps), keeping
  entries with parameters (ResNet's `act1` is a stem activation, not a stage). When the deepest entry lives in
  a container (`blocks.6`, `stages.3`), every child of that container from the first listed one on is a stage:
  EfficientNet and MobileNet list only the blocks that change resolution (`blocks.4`, `blocks.6`, not
  `blocks.5`), and reinit2 must not leave a fresh block behind a stale one; entries outside the container are
  stems (MobileNetV3's `bn1`) and are dropped. Otherwise (ResNet `layer1..4`, RegNet `stem, s1..s4`) the kept
  entries are the stages (RegNet's stem among them). A backbone without `feature_info` is a ConfigError naming it.
- PaperVGG: the five conv blocks between max-pools of its VGG-13 BN stack. They are slices of one
  `nn.Sequential`, not modules of their own, so their names use slice notation, `net.features.0[28:34]`;
  `get_stage` resolves both forms.
- UNet2DModel: `down_blocks.*`, `mid_block`, `up_blocks.*` (reinit_up+all resets `up_blocks[-1]`).
Parameters between the last stage and the head (PaperVGG's `pre_logits`, ConvNeXt's head norm) are kept by
reinit<k>; they belong to neither.

LoRA (peft): adapters of rank r (lora_alpha = r, so scaling 1; dropout 0) on every Conv2d and Linear layer,
the classifier head included. Only the adapter weights (lora_A, lora_B) train: the head does not, so `lora`
measures what low-rank updates alone recover. peft's `inject_adapter_in_model` wraps layers in place, so the
model keeps its call signature (`model(x)`, `model(x_t, t).sample`); `Prepared.merged()` folds the adapters
into a plain copy with the original parameter names, for checkpoints and evaluation.

Preparations (sophon.attacks.AttackSettings; `finetune` applies them after the strategy, before the optimiser is
made, in this order, and never from scratch):
- shrink-and-perturb (`shrink`, `perturb`; Ash & Adams 2020): θ ← shrink·θ + perturb·θ_fresh, θ_fresh the
  same parameter after a seeded fresh init of a copy of the whole model (module-local `reset_parameters()`, as
  above). It applies to the parameters the strategy trains and did not just re-initialise (`shrinkable`): all of
  them for direct+all, all but the head for initFC+all, none for initFC+FC (only the fresh head trains), the
  stages before the fresh ones for reinit<k>+all. For lora it applies to nothing: the adapters are new (lora_B
  zero, lora_A fresh), and the base weights are frozen, so shrinking them is not what a LoRA attacker trains
  from; the run equals plain lora. (1.0, 0.0) is off.
- BatchNorm recalibration (`recalibrate_bn`): every BatchNorm layer's running statistics re-estimated as a
  cumulative average over one pass of the adversary's data, without gradient (`recalibrate_batchnorm`). Models
  without BatchNorm (the diffusion UNet uses GroupNorm; LayerNorm transformers) are left as they are, no error.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sophon.errors import ConfigError
from sophon.models import Classifier, PaperVGG
from sophon.tasks import TASKS as TASK_REGISTRY

TASKS = tuple(TASK_REGISTRY)  # sophon.tasks: the tasks a strategy can serve
_SLICE = re.compile(r"^(.*)\[(\d+):(\d+)\]$")


@dataclass
class Prepared:
    """A starting model for the attack, and exactly what the strategy changed."""

    model: nn.Module  # the object passed to `prepare` (with adapters injected for lora)
    trainable: list[nn.Parameter]  # what the optimiser must update; the only parameters with requires_grad
    reinitialised: list[str]  # names, as before preparation, of parameters given fresh random values
    strategy: str = ""

    def merged(self) -> nn.Module:
        """lora: a plain copy with the adapters merged into the base weights (same outputs, the original
        parameter names, everything requires_grad); the adapted model is left as it is. Otherwise: the model."""
        if self.strategy != "lora":
            return self.model
        from peft.tuners.tuners_utils import BaseTunerLayer

        plain = copy.deepcopy(self.model)
        for name, module in list(plain.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(plain.get_submodule(parent), child, module.get_base_layer())
        return plain.requires_grad_(True)


@dataclass(frozen=True)
class Strategy:
    form: str  # how the name is written in error messages
    pattern: re.Pattern
    tasks: tuple[str, ...]
    apply: Callable[..., Prepared]  # apply(model, match, *, seed, lora_rank)


STRATEGIES: list[Strategy] = []


def register_strategy(form: str, pattern: str, tasks: tuple[str, ...]):
    """Add a strategy; `pattern` must match the whole name (its groups reach `apply` through the match)."""
    def wrap(fn: Callable[..., Prepared]) -> Callable[..., Prepared]:
        STRATEGIES.append(Strategy(form, re.compile(pattern), tuple(tasks), fn))
        return fn

    return wrap


def _lookup(strategy: str, task: str) -> tuple[Strategy, re.Match]:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    for entry in STRATEGIES:
        match = entry.pattern.fullmatch(strategy) if isinstance(strategy, str) else None
        if task in entry.tasks and match:
            return entry, match
    allowed = ", ".join(entry.form for entry in STRATEGIES if task in entry.tasks)
    raise ConfigError(f"fine-tuning strategy {strategy!r} is not allowed for {task}; allowed: {allowed}")


def check_strategy(strategy: str, task: str) -> None:
    """Validate a name from params.yaml before any model is built (ConfigError, one line, naming the forms)."""
    _lookup(strategy, task)


def task_of(model: nn.Module) -> str:
    if isinstance(model, Classifier):
        return "classification"
    from diffusers import UNet2DModel

    if isinstance(model, UNet2DModel):
        return "diffusion"
    raise TypeError(f"no fine-tuning strategies for a {type(model).__name__}: expected a sophon Classifier "
                    f"or a diffusers UNet2DModel")


def prepare(model: nn.Module, strategy: str, *, seed: int, lora_rank: int = 4) -> Prepared:
    """Apply `strategy` to `model` in place; the task follows from the model's type."""
    entry, match = _lookup(strategy, task_of(model))
    prepared = entry.apply(model, match, seed=seed, lora_rank=lora_rank)
    prepared.strategy = strategy
    return prepared


# --- stages ------------------------------------------------------------------------------------------------

def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    return (model.net, "net.") if isinstance(model, Classifier) else (model, "")


def _model_name(net: nn.Module) -> str:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(net).__name__


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _vgg_stages(net: PaperVGG) -> list[str]:
    layers = net.features[0]
    stages, start = [], 0
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.MaxPool2d):
            if i > start:
                stages.append(f"features.0[{start}:{i}]")
            start = i + 1
    return stages


def _timm_stages(net: nn.Module) -> list[str]:
    info = getattr(net, "feature_info", None)
    if not info:
        raise ConfigError(f"cannot find the stages of {_model_name(net)}: it has no timm feature_info "
                          f"(reinit<k>+all needs them; use initFC+all, direct+all or lora)")
    listed = [entry["module"] for entry in info if _has_parameters(net.get_submodule(entry["module"]))]
    if not listed:
        raise ConfigError(f"cannot find the stages of {_model_name(net)}: no feature_info entry has parameters")
    parent, _, _ = listed[-1].rpartition(".")
    if not parent:
        return listed
    children = [f"{parent}.{name}" for name, child in net.get_submodule(parent).named_children()
                if _has_parameters(child)]
    first = min(children.index(name) for name in listed if name in children)
    return children[first:]


def model_stages(model: nn.Module) -> list[str]:
    """Names of the model's stages, input → output (see the module docstring for how each family is read)."""
    if not isinstance(model, Classifier) and hasattr(model, "up_blocks") and hasattr(model, "down_blocks"):
        return ([f"down_blocks.{i}" for i in range(len(model.down_blocks))] + ["mid_block"]
                + [f"up_blocks.{i}" for i in range(len(model.up_blocks))])
    net, prefix = _backbone(model)
    names = _vgg_stages(net) if isinstance(net, PaperVGG) else _timm_stages(net)
    return [prefix + name for name in names]


def get_stage(model: nn.Module, name: str) -> nn.Module:
    """The module a `model_stages` name stands for (a slice `a.b[i:j]` gives an nn.Sequential view)."""
    sliced = _SLICE.match(name)
    if sliced:
        return model.get_submodule(sliced[1])[int(sliced[2]):int(sliced[3])]
    return model.get_submodule(name)


# --- helpers -----------------------------------------------------------------------------------------------

def _train_only(model: nn.Module, params: list[nn.Parameter] | None) -> list[nn.Parameter]:
    """Set requires_grad on every parameter (None: train all), so even an optimiser built from
    model.parameters() cannot move a frozen one; return the trainable ones in model order."""
    keep = None if params is None else {id(p) for p in params}
    trainable = []
    for p in model.parameters():
        p.requires_grad_(keep is None or id(p) in keep)
        if p.requires_grad:
            trainable.append(p)
    return trainable


def _reinitialise(model: nn.Module, modules: list[nn.Module], seed: int) -> list[str]:
    """reset_parameters() (and reset_running_stats()) of every submodule that has one, under
    torch.manual_seed(seed); returns the names of the parameters that were reset, in model order."""
    torch.manual_seed(seed)
    seen: set[int] = set()
    reset: set[int] = set()
    covered: set[int] = set()
    for module in modules:
        for sub in module.modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            covered |= {id(p) for p in sub.parameters(recurse=False)}
            if callable(getattr(sub, "reset_parameters", None)):
                sub.reset_parameters()
                reset |= {id(p) for p in sub.parameters(recurse=False)}
            if callable(getattr(sub, "reset_running_stats", None)):
                sub.reset_running_stats()
    names = {id(p): name for name, p in model.named_parameters()}
    kept = [names[i] for i in covered - reset if i in names]
    if kept:
        warnings.warn(f"kept the current values of {len(kept)} parameters whose module has no "
                      f"reset_parameters(): {', '.join(sorted(kept)[:5])}{', …' if len(kept) > 5 else ''}")
    return [name for name, p in model.named_parameters() if id(p) in reset]


def _head(model: Classifier) -> nn.Module:
    head = model.net.get_classifier()
    if not isinstance(head, nn.Module) or not _has_parameters(head):
        raise ConfigError(f"{_model_name(model.net)} has no classifier head with parameters to re-initialise")
    return head


# --- the strategies ----------------------------------------------------------------------------------------

@register_strategy("direct+all", r"direct\+all", TASKS)
def _direct(model: nn.Module, match: re.Match, *, seed: int, lora_rank: int) -> Prepared:
    return Prepared(model, _train_only(model, None), [])


@register_strategy("initFC+all", r"initFC\+all", ("classification",))
def _init_fc_all(model: Classifier, match: re.Match, *, seed: int, lora_rank: int) -> Prepared:
    return Prepared(model, _train_only(model, None), _reinitialise(model, [_head(model)], seed))


@register_strategy("initFC+FC", r"initFC\+FC", ("classification",))
def _init_fc_fc(model: Classifier, match: re.Match, *, seed: int, lora_rank: int) -> Prepared:
    head = _head(model)
    reinitialised = _reinitialise(model, [head], seed)
    return Prepared(model, _train_only(model, list(head.parameters())), reinitialised)


@register_strategy("reinit<k>+all (k >= 1)", r"reinit([1-9][0-9]*)\+all", ("classification",))
def _reinit_stages(model: Classifier, match: re.Match, *, seed: int, lora_rank: int) -> Prepared:
    k = int(match[1])
    stages = model_stages(model)
    if k > len(stages):
        raise ConfigError(f"fine-tuning strategy {match[0]!r}: {_model_name(model.net)} has only "
                          f"{len(stages)} stages ({', '.join(stages)})")
    modules = [get_stage(model, name) for name in stages[-k:]] + [_head(model)]
    return Prepared(model, _train_only(model, None), _reinitialise(model, modules, seed))


@register_strategy("reinit_up+all", r"reinit_up\+all", ("diffusion",))
def _reinit_up(model: nn.Module, match: re.Match, *, seed: int, lora_rank: int) -> Prepared:
    return Prepared(model, _train_only(model, None), _reinitialise(model, [model.up_blocks[-1]], seed))


@register_strategy("lora", r"lora", TASKS)
def _lora(model: nn.Module, match: re.Match, *, seed: int, lora_rank: int) -> Prepared:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    if not isinstance(lora_rank, int) or lora_rank < 1:
        raise ConfigError(f"lora rank must be a positive integer, got {lora_rank!r}")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; prepare a fresh copy")
    targets = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(seed)  # lora_A's Kaiming init; lora_B starts at zero, so outputs start unchanged
    inject_adapter_in_model(config, model)
    adapters = [p for m in model.modules() if isinstance(m, LoraLayer)
                for p in [*m.lora_A.parameters(), *m.lora_B.parameters()]]
    return Prepared(model, _train_only(model, adapters), [])


# --- preparations: what an attacker may do to the prepared model before fine-tuning ------------------------

def shrinkable(prepared: Prepared) -> list[str]:
    """The parameters shrink-and-perturb applies to: those the strategy trains, less those it just gave fresh
    random values (a re-initialised head has nothing to recover). For lora: none (see the module docstring)."""
    if prepared.strategy == "lora":
        return []
    fresh = set(prepared.reinitialised)
    trainable = {id(p) for p in prepared.trainable}
    return [name for name, p in prepared.model.named_parameters() if id(p) in trainable and name not in fresh]


@torch.no_grad()
def shrink_perturb(model: nn.Module, names: list[str], shrink: float, perturb: float, *, seed: int) -> list[str]:
    """Shrink-and-perturb (Ash & Adams 2020) in place: θ ← shrink·θ + perturb·θ_fresh for the named parameters,
    θ_fresh from a copy of the model whose every submodule was reset (`reset_parameters()`, module order) under
    `torch.manual_seed(seed)`. Parameters without a fresh init (no `reset_parameters()`) keep their values, with a
    warning. Returns the names changed. (1.0, 0.0) changes nothing and draws no random numbers."""
    if (shrink, perturb) == (1.0, 0.0) or not names:
        return []
    fresh = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reset = set(_reinitialise(fresh, [fresh], seed))
    fresh_values = dict(fresh.named_parameters())
    params = dict(model.named_parameters())
    missing = [name for name in names if name not in params]
    if missing:
        raise KeyError(f"shrink_perturb: no parameters named {', '.join(missing[:5])}")
    kept = [name for name in names if name not in reset]
    if kept:
        warnings.warn(f"shrink-and-perturb kept {len(kept)} parameters that have no fresh init "
                      f"(no reset_parameters()): {', '.join(kept[:5])}{', …' if len(kept) > 5 else ''}")
    changed = [name for name in names if name in reset]
    for name in changed:
        params[name].mul_(shrink).add_(fresh_values[name].to(params[name].device), alpha=perturb)
    return changed


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics (timm's BatchNormAct2d included)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data, *, batch_size: int, device: torch.device | str = "cpu",
                          forward: Callable | None = None) -> int:
    """Re-estimate every BatchNorm layer's running statistics on `data` (an ImageSet): running stats reset,
    momentum None (a cumulative average over the batches), one pass in the data's order in batches of
    `batch_size`, no gradient; the BatchNorm layers in train mode, every other module in eval mode (no dropout);
    then every module's mode and momentum restored. `forward(model, uint8 images)` runs a batch (default:
    `model(to_input(images))`, a classifier). Returns the number of layers recalibrated: a model without
    BatchNorm (the diffusion UNet's GroupNorm) is a no-op, with no forward pass and no error."""
    from sophon.train import to_input

    layers = batchnorms(model)
    if not layers:
        return 0
    if forward is None:
        def forward(net, images):
            return net(to_input(images, device))
    modes = {m: m.training for m in model.modules()}
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    try:
        for start in range(0, len(data), batch_size):
            forward(model, data.images[start:start + batch_size])
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for module, training in modes.items():
            module.training = training
    return len(layers)
