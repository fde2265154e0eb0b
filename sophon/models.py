"""Model registry over timm names plus the paper's small VGG; checkpoint I/O (initFC and the other attack
strategies live in sophon.strategies).

Checkpoints are `model.safetensors` plus a `model.json` card. Loading never unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sophon import __version__
from sophon.errors import CheckpointError, ConfigError, UnknownNameError, unknown
from sophon.io import atomic_dir, atomic_path, read_json, sha256_file, write_json

# Quick-profile inputs are scaled to [-1, 1]; the card records it so every loader agrees.
DEFAULT_NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def wrap(builder):
        MODEL_BUILDERS[name] = builder
        return builder

    return wrap


class PaperVGG(nn.Module):
    """The paper's 'VGG' (about 9.6 M parameters): a VGG-13 BN feature stack and a small classifier,
    not timm's VGG with its 4096-wide head. Exposes timm's head API (get_classifier, reset_classifier)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        layers = make_layers(cfgs["B"], batch_norm=True)
        if in_chans != 3:
            layers[0] = nn.Conv2d(in_chans, 64, kernel_size=3, padding=1)
        self.features = nn.Sequential(layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.pre_logits = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True))
        self.fc = nn.Linear(512, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.fc.in_features, num_classes)


@register_model("paper_vgg")
def _paper_vgg(num_classes: int, in_chans: int) -> nn.Module:
    return PaperVGG(num_classes, in_chans)


class Classifier(nn.Module):
    """A backbone with its input normalisation, so a checkpoint is usable on raw [0, 1] images."""

    def __init__(self, backbone: nn.Module, normalization: dict):
        super().__init__()
        self.net = backbone
        channels = getattr(backbone, "in_chans", None) or len(normalization["mean"])
        self.normalization = {"mean": list(normalization["mean"]), "std": list(normalization["std"])}
        mean = torch.tensor(normalization["mean"][:channels]).view(1, -1, 1, 1)
        std = torch.tensor(normalization["std"][:channels]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def _normalize(self, x):
        x = (x - self.mean) / self.std
        # Under torch.func.vmap (sophon.simulate.AdversaryBatch) a batched tensor cannot be asked for a memory format.
        if x.ndim != 4 or torch._C._functorch.is_batchedtensor(x):
            return x
        return x.contiguous(memory_format=torch.channels_last)

    def forward(self, x):
        return self.net(self._normalize(x))

    def features(self, x):
        """Pre-logit features (used by NTL's MMD term)."""
        net = self.net
        return net.forward_head(net.forward_features(self._normalize(x)), pre_logits=True)


def build_classifier(arch: str, num_classes: int, in_chans: int = 3, normalization: dict | None = None) -> Classifier:
    """Any timm model name, or a name registered here (paper_vgg). Randomly initialised."""
    normalization = normalization or DEFAULT_NORMALIZATION
    if arch in MODEL_BUILDERS:
        backbone = MODEL_BUILDERS[arch](num_classes=num_classes, in_chans=in_chans)
    else:
        import timm

        if not timm.is_model(arch):
            raise unknown("model", arch, list(MODEL_BUILDERS) + ["<any timm model name>"])
        backbone = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    # Channels-last convolutions: measured on test_resnet at 28×28 on one CPU thread, 22–28 % faster training
    # and 39 % faster evaluation than the default layout (usually faster on GPUs too).
    return Classifier(backbone, normalization).to(memory_format=torch.channels_last)


def head_parameter_names(model: Classifier) -> set[str]:
    head = model.net.get_classifier()
    head_ids = {id(p) for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head_ids}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- checkpoints -------------------------------------------------------------------------------

WEIGHTS, CARD = "model.safetensors", "model.json"


def compute_environment() -> dict:
    """What decides a run's floating-point rounding beyond its seeds: the torch build and the CPU kernels it
    dispatches to (AVX2 and AVX512 kernels sum in different orders, so the same seeds train different weights)."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def save_checkpoint(model: nn.Module, folder: str | Path, card: dict) -> None:
    """Write weights then the card (with the weights' hash), each atomically; the card comes last,
    so a folder with a card always holds complete weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    full_card = {**card, "weights_sha256": sha256_file(folder / WEIGHTS), "sophon_version": __version__,
                 "num_parameters": count_parameters(model), "compute": compute_environment()}
    write_json(folder / CARD, full_card)


def read_card(folder: str | Path) -> dict:
    path = Path(folder) / CARD
    if not path.exists():
        raise CheckpointError(f"checkpoint card missing: {path}")
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint card {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint's tensors with safetensors (no pickle), after checking them against the card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    card = read_card(folder)
    weights = folder / WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"checkpoint weights missing: {weights}")
    if card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
        raise CheckpointError(f"checkpoint {weights} is corrupted: its SHA-256 does not match {folder / CARD}")
    try:
        return load_file(str(weights)), card
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {weights} cannot be read: {exc}") from None


def load_checkpoint(folder: str | Path, kind: str, build: Callable[[dict], nn.Module],
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Read a checkpoint of `kind`, rebuild its module from the card with `build(card)`, load the weights strictly."""
    state, card = load_state(folder)
    if card.get("kind", "classifier") != kind:
        raise CheckpointError(f"{folder} holds a {card.get('kind', 'classifier')} checkpoint, not a {kind}")
    try:
        model = build(card)
    except KeyError as exc:
        raise CheckpointError(f"checkpoint card {Path(folder) / CARD} lacks the key {exc}") from None
    except UnknownNameError as exc:
        raise CheckpointError(f"checkpoint card {Path(folder) / CARD}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {folder} does not fit its card's {kind} configuration: {first}") from None
    return model.to(map_location), card


def load_classifier(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Rebuild a classifier from its card and load its safetensors weights."""
    return load_checkpoint(folder, "classifier", lambda card: build_classifier(
        card["architecture"], card["num_classes"], card["in_chans"], card["normalization"]), map_location)


# --- import and release in timm's own format ------------------------------------------------------------------

def _net_state(model: Classifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}


def import_timm(path: str | Path, arch: str, num_classes: int, in_chans: int, *,
                key: str = "original.checkpoint") -> tuple[Classifier, dict]:
    """A Classifier holding the weights of a timm model's own state dict (`.safetensors`, the keys of
    `timm.create_model(arch)`), checked against the experiment's architecture, classes and channels; every
    mismatch is a one-line ConfigError naming `key`. The input normalisation comes from a timm `config.json`
    beside the file (`pretrained_cfg.mean/std`, as `release_classifier` writes it), else the project's default.
    Returns the model and its source (kind, path, SHA-256 of the file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{key}: {path} is not a .safetensors file (only safetensors weights are imported, never pickles)")
    if not path.is_file():
        raise ConfigError(f"{key}: {path}: file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {path} cannot be read as safetensors: {exc}") from None
    normalization = DEFAULT_NORMALIZATION
    config_file = path.parent / "config.json"
    if config_file.is_file():
        cfg = read_json(config_file).get("pretrained_cfg", {})
        if cfg.get("mean") and cfg.get("std"):
            normalization = {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    model = build_classifier(arch, num_classes, in_chans, normalization)
    expected = model.net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        def some(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        found = "; ".join(part for part in (missing and f"missing {some(missing)}",
                                            unexpected and f"unexpected {some(unexpected)}") if part)
        raise ConfigError(f"{key}: {path} is not a state dict of model.arch = {arch} ({found})")
    head = sorted(name.removeprefix("net.") for name in head_parameter_names(model) if name.endswith("weight"))
    for name in head:
        if name in state and state[name].shape[0] != expected[name].shape[0]:
            raise ConfigError(f"{key}: {path} has {state[name].shape[0]} classes ({name}), "
                              f"model.num_classes is {num_classes}")
    for name, tensor in expected.items():
        got = tuple(state[name].shape)
        if got != tuple(tensor.shape):
            if tensor.ndim == 4 and tensor.shape[1] == in_chans and len(got) == 4 and got[1] != in_chans:
                why = f"it takes {got[1]} input channels, data.channels is {in_chans}"
            else:
                why = f"model.arch = {arch} expects {tuple(tensor.shape)}"
            raise ConfigError(f"{key}: {path} holds {name} of shape {got}; {why}")
    model.net.load_state_dict(state, strict=True)
    return model, {"kind": "timm-safetensors", "path": str(path), "sha256": sha256_file(path)}


def release_classifier(model: Classifier, folder: str | Path, card: dict) -> None:
    """Write `folder` (atomically, as a whole) in timm's Hugging Face layout: `model.safetensors` (the timm net's
    own state dict) and `config.json` (architecture, num_classes, model_args and a pretrained_cfg with the input
    normalisation, which lives outside timm's net), so that `timm.create_model("local-dir:<folder>", pretrained=True)`
    loads it. A net that is not a timm model (paper_vgg) gets the same files; only this project rebuilds it."""
    from safetensors.torch import save_file

    net = model.net
    with atomic_dir(folder) as tmp:
        save_file(_net_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        data_config = {"mean": tuple(model.normalization["mean"]), "std": tuple(model.normalization["std"]),
                       "input_size": tuple(card["input_size"]), "crop_pct": 1.0, "interpolation": "bilinear"}
        if hasattr(net, "pretrained_cfg"):
            from timm.models._hub import save_config_for_hf

            save_config_for_hf(net, str(tmp / "config.json"), data_config=data_config)
            config = read_json(tmp / "config.json")
            for stale in ("tag", "license", "hf_hub_id", "url", "paper_ids", "paper_name", "notes", "origin_url"):
                config["pretrained_cfg"].pop(stale, None)  # they describe timm's own pretrained weights
        else:
            config = {"architecture": card["architecture"], "num_classes": card["num_classes"],
                      "pretrained_cfg": {**data_config, "num_classes": card["num_classes"]},
                      "note": "not a timm architecture: load with sophon.models (build_classifier)"}
        config["sophon"] = {k: card[k] for k in ("experiment", "stage", "domains", "config_hash", "source")
                             if k in card}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
