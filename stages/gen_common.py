"""What the generation stages share: the validated `generation` section, the objective, parts and models."""

from __future__ import annotations

import dataclasses

import torch

from sophon import layout
from sophon.data import domain_names
from sophon.data.splits import load_part
from sophon.diffusion import DiffusionObjective, UNetSpec, build_unet, load_unet
from sophon.errors import ConfigError
from sophon.io import config_hash
from sophon.protect import ProtectSettings


def section(config: dict, source: str = "params.yaml") -> dict:
    """The `generation` section, with the names the schema cannot check (registered domains) checked here."""
    gen = config["generation"]
    for key in ("original", "restricted"):
        name = gen[key]["domain"]
        if name not in domain_names():
            raise ConfigError(f"{source}: key 'generation.{key}.domain' = {name}: unknown domain; "
                              f"known: {', '.join(domain_names())}")
    return gen


def spec(gen: dict) -> UNetSpec:
    return UNetSpec(gen["data"]["image_size"], gen["data"]["channels"], dict(gen["unet"]))


def new_unet(gen: dict, seed: int):
    torch.manual_seed(seed)
    return build_unet(gen["unet"], gen["data"]["image_size"], gen["data"]["channels"])


def objective(gen: dict, device, suppression: str | None = None) -> DiffusionObjective:
    return DiffusionObjective(suppression or gen["sophon"]["suppression"], device,
                              augment_flip=gen["augment"]["flip"], augment_shift=gen["augment"]["shift"],
                              eval_seed=gen["eval"]["seed"], eval_repeats=gen["eval"]["repeats"])


def part(name: str):
    return load_part(layout.gen_split_part(name), layout.gen_split_manifest())


def model(name: str, device):
    return load_unet(layout.gen_model_dir(name), device)


def protect_settings(cfg: dict, **changes) -> ProtectSettings:
    """ProtectSettings from `generation.sophon`; a UNet is only ever fine-tuned directly (no head to reset)."""
    fields = {f.name for f in dataclasses.fields(ProtectSettings)}
    values = {k: v for k, v in cfg.items() if k in fields and k != "task_space"}
    values["task_space"] = {"starts": ["direct"], **cfg["task_space"]}
    values.update(changes)
    return ProtectSettings(**values)


def card_extra(gen: dict, stage: str, extra: dict | None = None) -> dict:
    keys = ("data", "original", "restricted", "unet", "augment", "pretrain", stage)
    return {"domains": {"original": gen["original"]["domain"], "restricted": gen["restricted"]["domain"]},
            "stage": stage, "config_hash": config_hash({k: gen[k] for k in keys if k in gen}), **(extra or {})}
