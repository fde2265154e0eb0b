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


def search_result(experiment: str, start: str) -> Path:
    """One start's attack search (`experiment` is classification or generation)."""
    return Path("results/search") / experiment / f"{start}.json"


def search_cache(experiment_name: str) -> Path:
    """Finished search runs by content key (sophon.search.RunCache); not a pipeline output, so never deleted by it."""
    return Path(".cache/search") / experiment_name


def report_dir(experiment: str) -> Path:
    return Path("reports") / experiment


# --- the generation (diffusion) experiment: its own folders under a `generation` prefix ----------------------

GEN_SPLIT_PARTS = ("original_train", "original_val", "original_test", "defender", "adversary", "restricted_test")
GEN_MODELS = ("original", "sophon")
GEN_STARTS = ("scratch", "original", "sophon")
GEN_SUPPRESSIONS = ("dos", "neg_mse")


def gen_split_part(part: str) -> Path:
    return Path("data/generation") / f"{part}.safetensors"


def gen_split_manifest() -> Path:
    return Path("data/generation/manifest.json")


def gen_model_dir(name: str) -> Path:
    return Path("models/generation") / name


def gen_model_files(name: str) -> list[Path]:
    return [gen_model_dir(name) / WEIGHTS, gen_model_dir(name) / CARD]


def gen_history(name: str) -> Path:
    return Path("results/generation/training") / f"{name}.json"


def gen_attack_curve(attack: str, start: str, seed) -> Path:
    return Path("results/generation/attacks") / attack / start / f"seed_{seed}.json"


def gen_attack_denoised(attack: str, start: str, seed) -> Path:
    """The fine-tuned model's denoising of the figure's restricted test images (for the report's figure)."""
    return Path("results/generation/attacks") / attack / start / f"seed_{seed}.denoised.safetensors"


def gen_stability(loss: str, seed) -> Path:
    return Path("results/generation/stability") / loss / f"seed_{seed}.json"
