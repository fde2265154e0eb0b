"""The task registry: what differs between classification and diffusion, in one place, so every stage serves
both (the experiment's `task` picks the entry). An experiment is one validated section of params.yaml's
`experiments`, with its name under `name`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sophon.errors import unknown
from sophon.io import config_hash

if TYPE_CHECKING:  # the registry itself imports no torch: the Snakefile reads it to build the DAG
    import torch


@dataclass(frozen=True)
class Task:
    name: str
    starts: tuple[str, ...]  # where an attack can start; `scratch` is a fresh model
    metric: str  # the restricted-domain curve's key in result files
    build: Callable[[dict], torch.nn.Module]  # a randomly initialised model of the experiment
    load: Callable[[Path, torch.device], tuple[torch.nn.Module, dict]]
    card: Callable[[dict, torch.nn.Module], dict]  # architecture part of the checkpoint card
    objective: Callable[..., object]  # (experiment, device, suppression=None) -> sophon.objectives.Objective
    # (experiment, path) -> (model, source): a user's model in the ecosystem's format (original.checkpoint)
    import_model: Callable[[dict, Path], tuple[torch.nn.Module, dict]]
    # (model, folder, card): the model in the ecosystem's format (timm / diffusers), beside the project's checkpoint
    release_model: Callable[[torch.nn.Module, Path, dict], None]

    def save(self, model, experiment: dict, name: str, stage: str, extra: dict | None = None) -> None:
        """Checkpoint `model` as models/<experiment>/<name> with its card (architecture, domains, config hash)."""
        from sophon import layout
        from sophon.models import save_checkpoint

        keys = ("data", "original", "restricted", "model", "unet", "augment", "pretrain", stage)
        save_checkpoint(model.cpu(), layout.model_dir(experiment["name"], name), {
            **self.card(experiment, model), "task": self.name, "experiment": experiment["name"],
            "domains": {"original": experiment["original"]["domain"], "restricted": experiment["restricted"]["domain"]},
            "stage": stage, "config_hash": config_hash({k: experiment[k] for k in keys if k in experiment}),
            **(extra or {})})

    def release(self, model, experiment: dict, name: str) -> None:
        """models/<experiment>/<name>/release: the saved model `name` (its card written) in the ecosystem's format."""
        from sophon import layout
        from sophon.models import read_card

        folder = layout.model_dir(experiment["name"], name)
        self.release_model(model.cpu(), layout.release_dir(experiment["name"], name), read_card(folder))

    def imported(self, experiment: dict) -> tuple[torch.nn.Module, dict]:
        """The experiment's `original.checkpoint`, checked against its configuration."""
        return self.import_model(experiment, Path(experiment["original"]["checkpoint"]))

    def models(self) -> tuple[str, ...]:
        """The trained models: every start but scratch."""
        return tuple(s for s in self.starts if s != "scratch")


# --- classification ----------------------------------------------------------------------------------------------

def _build_classifier(experiment: dict):
    from sophon.models import build_classifier

    model = experiment["model"]
    return build_classifier(model["arch"], model["num_classes"], experiment["data"]["channels"])


def _classifier_card(experiment: dict, model=None) -> dict:
    from sophon.models import DEFAULT_NORMALIZATION

    data = experiment["data"]
    return {"kind": "classifier", "architecture": experiment["model"]["arch"],
            "num_classes": experiment["model"]["num_classes"], "in_chans": data["channels"],
            "input_size": [data["channels"], data["image_size"], data["image_size"]],
            "normalization": getattr(model, "normalization", None) or DEFAULT_NORMALIZATION}


def _import_classifier(experiment: dict, path: Path):
    from sophon.models import import_timm

    return import_timm(path, experiment["model"]["arch"], experiment["model"]["num_classes"],
                       experiment["data"]["channels"], key=f"experiments.{experiment['name']}.original.checkpoint")


def _release_classifier(model, folder: Path, card: dict) -> None:
    from sophon.models import release_classifier

    release_classifier(model, folder, card)


def _classification_objective(experiment: dict, device, suppression: str | None = None):
    from sophon.objectives import ClassificationObjective

    return ClassificationObjective(suppression or experiment["sophon"]["suppression"], device)


def _load_classifier(folder, device):
    from sophon.models import load_classifier

    return load_classifier(folder, device)


# --- diffusion ---------------------------------------------------------------------------------------------------

def _build_unet(experiment: dict):
    from sophon.diffusion import build_unet

    return build_unet(experiment["unet"], experiment["data"]["image_size"], experiment["data"]["channels"])


def _unet_card(experiment: dict, model=None) -> dict:
    from sophon.diffusion import UNetSpec, unet_config

    card = UNetSpec(experiment["data"]["image_size"], experiment["data"]["channels"], dict(experiment["unet"])).card()
    return {**card, "diffusers_config": unet_config(model)} if model is not None else card


def _import_unet(experiment: dict, path: Path):
    from sophon.diffusion import import_unet

    return import_unet(path, experiment["data"]["image_size"], experiment["data"]["channels"],
                       key=f"experiments.{experiment['name']}.original.checkpoint")


def _release_unet(model, folder: Path, card: dict) -> None:
    from sophon.diffusion import release_unet

    release_unet(model, folder, card)


def _diffusion_objective(experiment: dict, device, suppression: str | None = None):
    from sophon.diffusion import DiffusionObjective

    return DiffusionObjective(suppression or experiment["sophon"]["suppression"], device,
                              augment_flip=experiment["augment"]["flip"], augment_shift=experiment["augment"]["shift"],
                              eval_seed=experiment["eval"]["seed"], eval_repeats=experiment["eval"]["repeats"],
                              suppress_timesteps=experiment["sophon"].get("suppress_timesteps"))


def _load_unet(folder, device):
    from sophon.diffusion import load_unet

    return load_unet(folder, device)


TASKS = {
    "classification": Task("classification", ("scratch", "original", "ntl", "sophon"), "restricted_accuracy",
                           _build_classifier, _load_classifier, _classifier_card, _classification_objective,
                           _import_classifier, _release_classifier),
    "diffusion": Task("diffusion", ("scratch", "original", "sophon"), "restricted_mse",
                      _build_unet, _load_unet, _unet_card, _diffusion_objective, _import_unet, _release_unet),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise unknown("task", name, TASKS)
    return TASKS[name]


def task_of(experiment: dict) -> Task:
    return get_task(experiment["task"])


def load_model(experiment: dict, name: str, device: torch.device | str = "cpu"):
    from sophon import layout

    return task_of(experiment).load(layout.model_dir(experiment["name"], name), device)


def new_model(experiment: dict, seed: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A randomly initialised model of the experiment, reproducible for a seed."""
    import torch

    torch.manual_seed(seed)
    return task_of(experiment).build(experiment).to(device)
