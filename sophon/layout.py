"""Where every stage reads and writes: one place, used by the stages, the Snakemake rules and the
tests (dvc.yaml spells the same paths out; tests/test_orchestrators.py keeps them in agreement)."""

from __future__ import annotations

from pathlib import Path

SPLIT_PARTS = ("original_train", "original_test", "defender", "adversary", "restricted_test")
MODELS = ("original", "ntl", "sophon")
STARTS = ("scratch", "original", "ntl", "sophon")
WEIGHTS, CARD = "model.safetensors", "model.json"


def split_part(part: str) -> Path:
    return Path("data/splits") / f"{part}.safetensors"


def split_manifest() -> Path:
    return Path("data/splits/manifest.json")


def model_dir(name: str) -> Path:
    return Path("models") / name


def model_files(name: str) -> list[Path]:
    return [model_dir(name) / WEIGHTS, model_dir(name) / CARD]


def history(name: str) -> Path:
    return Path("results/training") / f"{name}.json"


def sweep_curve(lr) -> Path:
    return Path("results/sweep") / f"lr_{lr}.json"


def attack_curve(attack: str, start: str, seed) -> Path:
    return Path("results/attacks") / attack / start / f"seed_{seed}.json"


def report_dir(experiment: str) -> Path:
    return Path("reports") / experiment
