"""Diffusion in the core (paper §2.1, §4.3.2, §5.2.2): a diffusers `UNet2DModel` noise predictor, the DDPM
forward process (`DDPMScheduler`: T = 1000, linear betas 1e-4 → 0.02), and the objective that lets the one
fine-tuning simulation and protect loop (sophon.simulate, sophon.protect) run Sophon with the DoS loss.

Images are uint8 N×C×H×W in the data layer and x ∈ [-1, 1] here. Training samples one timestep per example,
uniformly from {0, …, T−1} (the reference code trains at t = 1 only; we do not). Evaluation uses noise and
timesteps drawn from a fixed seed, so the MSE of two models (or two runs) is measured on the same noised inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sophon.data import ImageSet
from sophon.errors import ConfigError
from sophon.io import atomic_dir, read_json, sha256_file, write_json
from sophon.losses import get_loss
from sophon.train import shift_images, train_epochs

# The quick profile's UNet: about 0.64 M parameters, no attention; fast at 16×16 on two CPU threads.
QUICK_UNET = {"block_out_channels": [16, 32, 64], "layers_per_block": 1, "attention": False, "norm_num_groups": 8}
SUPPRESSION_LOSSES = ("dos", "neg_mse", "inverse_noise")


# --- model and noise schedule ------------------------------------------------------------------------------

def build_unet(config: dict, image_size: int, channels: int):
    """A randomly initialised `UNet2DModel` from a small config: block_out_channels, layers_per_block,
    attention (attention blocks in the two deepest levels), norm_num_groups."""
    from diffusers import UNet2DModel

    widths = [int(w) for w in config.get("block_out_channels", QUICK_UNET["block_out_channels"])]
    groups = int(config.get("norm_num_groups", QUICK_UNET["norm_num_groups"]))
    if any(w % groups for w in widths):
        raise ConfigError(f"generation.unet.block_out_channels {widths} must all be divisible by "
                          f"generation.unet.norm_num_groups = {groups}")
    levels = len(widths)
    if image_size % (2 ** (levels - 1)):
        raise ConfigError(f"generation.data.image_size = {image_size} must be divisible by 2^{levels - 1} "
                          f"(the UNet has {levels} levels)")
    attention = bool(config.get("attention", False))
    down = ["AttnDownBlock2D" if attention and i >= levels - 2 else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if attention and i < 2 else "UpBlock2D" for i in range(levels)]
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       layers_per_block=int(config.get("layers_per_block", 1)), block_out_channels=tuple(widths),
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=groups)


def make_scheduler(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """DDPM forward process with linear betas (Ho et al. 2020; the paper's setting)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                         beta_start=beta_start, beta_end=beta_end)


def to_signed(images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1]."""
    return images.to(device).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def predict_noise(forward: Callable, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε_θ(x_t, t) from a UNet2DModel or from `functional_call` over one (both return an object with `.sample`)."""
    out = forward(x_t, t)
    return out.sample if hasattr(out, "sample") else out


def augment(images: torch.Tensor, generator: torch.Generator, *, flip: bool = True, shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and integer shifts of up to `shift` pixels (reflect padding) on uint8 images."""
    if flip:
        mask = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)
    if shift > 0:
        images = shift_images(images, generator, shift)
    return images


def noised(scheduler, x0: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None):
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε with ε ~ N(0, I) and t ~ U{0, …, T−1} per example (unless given)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    timesteps = timesteps.to(x0.device)
    return scheduler.add_noise(x0, noise, timesteps), noise, timesteps


def denoise_one_step(forward: Callable, scheduler, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t, the model's one-step estimate of the clean image (figures)."""
    alpha_bar = scheduler.alphas_cumprod.to(x_t.device)[t].view(-1, 1, 1, 1)
    eps = predict_noise(forward, x_t, t)
    return ((x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)


def figure_batch(data: ImageSet, count: int, timestep: int, seed: int = 0):
    """The denoising figures' inputs: the first `count` images, noised at one fixed timestep with noise from
    `seed` — identical in every stage that draws or denoises them. Returns (x0, x_t, t) in [-1, 1]."""
    x0 = to_signed(data.images[:count])
    generator = torch.Generator().manual_seed(seed)
    t = timesteps_like(len(x0), timestep)
    x_t, _, _ = noised(make_scheduler(), x0, generator, t)
    return x0, x_t, t


@torch.no_grad()
def denoise_figure_batch(model, scheduler, data: ImageSet, count: int, timestep: int, seed: int = 0,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 one-step denoisings of `figure_batch` by `model`."""
    was_training = model.training
    model.eval()
    _, x_t, t = figure_batch(data, count, timestep, seed)
    out = denoise_one_step(model, scheduler, x_t.to(device), t.to(device)).cpu()
    model.train(was_training)
    return to_uint8(out)


# --- evaluation --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_mse(model, data: ImageSet, scheduler, device: torch.device, *, seed: int = 0, repeats: int = 8,
                 batch_size: int = 512) -> float:
    """Noise-prediction MSE on `data` with fixed noise and timesteps: every image is noised `repeats` times with
    (ε, t) drawn from a generator seeded by `seed` alone, so every model sees the same noised inputs."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    x0 = to_signed(data.images).repeat(repeats, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    total, count = 0.0, 0
    for start in range(0, len(x0), batch_size):
        sl = slice(start, start + batch_size)
        x_t = scheduler.add_noise(x0[sl], noise[sl], timesteps[sl]).to(device)
        eps = predict_noise(model, x_t, timesteps[sl].to(device))
        total += F.mse_loss(eps, noise[sl].to(device), reduction="sum").item()
        count += eps.numel()
    model.train(was_training)
    return total / max(1, count)


# --- the objective (sophon.objectives.Objective) -----------------------------------------------------------

class DiffusionObjective:
    """Noise-prediction MSE for fine-tuning and reinforcement (t uniform per example); DoS ‖ε_θ(x_t, t)‖²
    (or the unstable −MSE) for suppression; quality = fixed-noise MSE (lower is better)."""

    higher_is_better = False

    def __init__(self, suppression: str = "dos", device: torch.device | None = None, *, scheduler=None,
                 augment_flip: bool = True, augment_shift: int = 2, eval_seed: int = 0, eval_repeats: int = 8,
                 suppress_timesteps: tuple[int, int] | None = None):
        if suppression not in SUPPRESSION_LOSSES:
            raise ConfigError(f"diffusion suppression loss {suppression!r} is not one of {', '.join(SUPPRESSION_LOSSES)}")
        self.suppression = suppression
        self.suppress = get_loss(suppression)
        self.device = device or torch.device("cpu")
        self.scheduler = scheduler or make_scheduler()
        self.augment_flip, self.augment_shift = augment_flip, augment_shift
        self.eval_seed, self.eval_repeats = eval_seed, eval_repeats
        total = self.scheduler.config.num_train_timesteps
        low, high = suppress_timesteps or (0, total)
        if not 0 <= low < high <= total:
            raise ConfigError(f"sophon.suppress_timesteps: [{low}, {high}] is not a range within [0, {total}]")
        self.suppress_timesteps = None if (low, high) == (0, total) else (low, high)  # None: as in training

    def _batch(self, forward, images, generator, timesteps: tuple[int, int] | None = None):
        images = augment(images, generator, flip=self.augment_flip, shift=self.augment_shift)
        t = None if timesteps is None else torch.randint(*timesteps, (len(images),), generator=generator)
        x_t, noise, t = noised(self.scheduler, to_signed(images, self.device), generator, t)
        return predict_noise(forward, x_t, t), noise

    def finetune_loss(self, forward, images, labels, generator):
        return F.mse_loss(*self._batch(forward, images, generator))

    def suppression_loss(self, forward, images, labels, generator):
        """On timesteps drawn from `suppress_timesteps` (all by default): at large t the input carries little
        of the image, so suppressing there fights the original domain's reinforcement."""
        predicted, noise = self._batch(forward, images, generator, self.suppress_timesteps)
        return self.suppress(predicted, noise)

    def model_inputs(self, images, generator):
        """The UNet's arguments for a uint8 batch, as the suppression loss noises it: `(x_t, t)`, t drawn from
        `suppress_timesteps` (all by default), no augmentation."""
        t = None if self.suppress_timesteps is None else torch.randint(*self.suppress_timesteps, (len(images),),
                                                                        generator=generator)
        x_t, _, t = noised(self.scheduler, to_signed(images, self.device), generator, t)
        return x_t, t

    def quality(self, model, data, device):
        return evaluate_mse(model, data, self.scheduler, device, seed=self.eval_seed, repeats=self.eval_repeats)


# --- stability (paper §5.8, Fig. 14) -----------------------------------------------------------------------

def classify_run(losses, *, threshold: float) -> str:
    """"nan" if any suppression loss is non-finite, "diverged" if its magnitude ever exceeds `threshold`,
    else "stable"."""
    values = torch.as_tensor([float(v) for v in losses], dtype=torch.float64)
    if len(values) and not torch.isfinite(values).all():
        return "nan"
    if len(values) and values.abs().max().item() > threshold:
        return "diverged"
    return "stable"


# --- checkpoints -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UNetSpec:
    image_size: int
    channels: int
    unet: dict

    def card(self) -> dict:
        return {"kind": "unet", "architecture": "diffusers.UNet2DModel", "unet": self.unet,
                "image_size": self.image_size, "in_chans": self.channels,
                "input_size": [self.channels, self.image_size, self.image_size],
                "normalization": "x = image / 127.5 - 1 (range [-1, 1])",
                "noise_schedule": {"num_train_timesteps": 1000, "beta_schedule": "linear",
                                   "beta_start": 1e-4, "beta_end": 0.02, "prediction_type": "epsilon"}}


def save_unet(model, folder: str | Path, spec: UNetSpec, extra: dict | None = None) -> None:
    from sophon.models import save_checkpoint

    save_checkpoint(model, folder, {**spec.card(), **(extra or {})})


def unet_config(model) -> dict:
    """The UNet2DModel's own diffusers config, as JSON (the card keeps it, so an imported UNet of any shape is
    rebuilt exactly)."""
    import json

    return json.loads(model.to_json_string())


def _rebuild(card: dict):
    if "diffusers_config" in card:
        from diffusers import UNet2DModel

        return UNet2DModel.from_config(card["diffusers_config"])
    return build_unet(card["unet"], card["image_size"], card["in_chans"])


def load_unet(folder: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the UNet2DModel from its card and load the safetensors weights (no pickle)."""
    from sophon.models import load_checkpoint

    return load_checkpoint(folder, "unet", _rebuild, map_location)


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def import_unet(folder: str | Path, image_size: int, channels: int, *, key: str = "original.checkpoint"):
    """A diffusers UNet2DModel from a `save_pretrained` folder (config.json + diffusion_pytorch_model.safetensors;
    safetensors only, never a pickle), checked against the experiment's image size and channels; every mismatch is
    a one-line ConfigError naming `key`. Returns the model and its source (kind, path, SHA-256 of the weights)."""
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights = folder / "config.json", folder / DIFFUSERS_WEIGHTS
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is not a folder (a diffusers UNet saved with save_pretrained)")
    if not config_file.is_file():
        raise ConfigError(f"{key}: {folder} holds no config.json (a diffusers UNet saved with save_pretrained)")
    if not weights.is_file():
        raise ConfigError(f"{key}: {folder} holds no {DIFFUSERS_WEIGHTS} (only safetensors weights are imported, "
                          "never pickles)")
    config = read_json(config_file)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"{key}: {folder} holds a {config['_class_name']}, not a UNet2DModel")
    size = config.get("sample_size")
    if size is not None and tuple(size if isinstance(size, (list, tuple)) else [size, size]) != (image_size, image_size):
        raise ConfigError(f"{key}: {folder} has sample_size {size}, data.image_size is {image_size}")
    for name in ("in_channels", "out_channels"):
        if config.get(name, 3) != channels:
            raise ConfigError(f"{key}: {folder} has {name} {config.get(name, 3)}, data.channels is {channels}")
    try:
        model = UNet2DModel.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"{key}: {folder} cannot be loaded as a UNet2DModel: {str(exc).splitlines()[0]}") from None
    stored, expected = set(load_file(str(weights))), set(model.state_dict())
    if stored != expected:  # diffusers initialises missing weights at random and only warns
        names = sorted(stored ^ expected)
        raise ConfigError(f"{key}: {folder}'s weights do not fit its config.json ({', '.join(names[:3])}"
                          f"{f' and {len(names) - 3} more' if len(names) > 3 else ''} differ)")
    return model, {"kind": "diffusers-folder", "path": str(folder), "sha256": sha256_file(weights)}


def release_unet(model, folder: str | Path, card: dict) -> None:
    """Write `folder` (atomically, as a whole) with diffusers' `save_pretrained` (safetensors), so that
    `UNet2DModel.from_pretrained(folder)` loads it, plus `sophon.json`: the noise schedule and the image scaling
    it was trained with, and where it came from."""
    import copy

    with atomic_dir(folder) as tmp:
        copy.deepcopy(model).cpu().save_pretrained(str(tmp), safe_serialization=True)
        write_json(tmp / "sophon.json", {k: card[k] for k in ("experiment", "stage", "domains", "config_hash",
                                                              "normalization", "noise_schedule", "source") if k in card})


def timesteps_like(n: int, t: int) -> torch.Tensor:
    return torch.full((n,), int(t), dtype=torch.int64)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between two batches in [-1, 1] (figure captions)."""
    mse = F.mse_loss(a, b).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)
