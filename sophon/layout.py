"""Where every stage reads and writes: one place, used by the stages, the Snakemake rules and the tests
(dvc.yaml spells the same paths out; tests/test_orchestrators.py keeps them in agreement).

Every path carries the experiment's name, so experiments (the two quick ones, the paper profile, a user's
variant) sit side by side and never overwrite each other:

    data/<experiment>/…   models/<experiment>/<model>/…   results/<experiment>/<stage>/…   reports/<experiment>/…
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS, CARD = "model.safetensors", "model.json"
SPLIT_PARTS = ("original_train", "original_val", "original_test", "defender", "adversary", "restricted_test")
# Every start an attack can take; a task serves a subset (sophon.tasks).
STARTS = ("scratch", "original", "ntl", "sophon")


def split_part(experiment: str, part: str) -> Path:
    return Path("data") / experiment / f"{part}.safetensors"


def split_manifest(experiment: str) -> Path:
    return Path("data") / experiment / "manifest.json"


def model_dir(experiment: str, name: str) -> Path:
    return Path("models") / experiment / name


def model_files(experiment: str, name: str) -> list[Path]:
    return [model_dir(experiment, name) / WEIGHTS, model_dir(experiment, name) / CARD]


def release_dir(experiment: str, name: str) -> Path:
    """A model in its ecosystem's format (timm's Hugging Face layout or a diffusers save_pretrained folder)."""
    return model_dir(experiment, name) / "release"


def results(experiment: str) -> Path:
    return Path("results") / experiment


def history(experiment: str, name: str) -> Path:
    """A trained model's history (pretrain, NTL, protect)."""
    return results(experiment) / "training" / f"{name}.json"


def sweep_dir(experiment: str) -> Path:
    """The lr sweep: one job writes every lr's curve."""
    return results(experiment) / "sweep"


def sweep_curve(experiment: str, lr) -> Path:
    return sweep_dir(experiment) / f"lr_{lr}.json"


def attack_dir(experiment: str, start: str) -> Path:
    """The paired attack grid from one start: one job writes every attack × seed."""
    return results(experiment) / "attacks" / start


def attack_curve(experiment: str, attack: str, start: str, seed) -> Path:
    return attack_dir(experiment, start) / attack / f"seed_{seed}.json"


def stability_dir(experiment: str) -> Path:
    """The stability study: one job writes every loss × seed."""
    return results(experiment) / "stability"


def stability(experiment: str, loss: str, seed) -> Path:
    return stability_dir(experiment) / loss / f"seed_{seed}.json"


def search_result(experiment: str, start: str) -> Path:
    """One start's attack search."""
    return results(experiment) / "search" / f"{start}.json"


def redteam_result(experiment: str, start: str) -> Path:
    """The red-team suite's runs against one start."""
    return results(experiment) / "redteam" / f"{start}.json"


def ablation_dir(experiment: str) -> Path:
    """The ablation of the protect stage's settings (stages.ablation), outside the default target."""
    return results(experiment) / "ablation"


def ablation_result(experiment: str, variant: str) -> Path:
    return ablation_dir(experiment) / f"{variant}.json"


def ablation_table(experiment: str) -> Path:
    """Beside the variants' folder, not in it (DVC's table stage depends on that folder)."""
    return results(experiment) / "ablation.md"


def ablation_model(experiment: str, variant: str) -> str:
    """The model name (models/<experiment>/<name>) of a variant's protected model."""
    return f"ablation/{variant}"


def run_cache(experiment: str) -> Path:
    """Finished fine-tuning runs (search and paired attacks) by content key (sophon.search.RunCache); not a
    pipeline output, so never deleted by it."""
    return Path(".cache/runs") / experiment


def protect_state(experiment: str) -> Path:
    """The protect stage's resume state (sophon.protect); outside the outputs, so DVC's removal of outs before a
    rerun keeps it. Removed when the stage finishes."""
    return Path(".cache/protect") / experiment


# The report's figures per task (reports/<experiment>/<figure>.png).
REPORT_FIGURES = {"classification": ("restricted_accuracy", "protect_history", "sweep", "envelope"),
                  "diffusion": ("mse_curves", "denoise_restricted", "denoise_original", "stability", "protect_history",
                                "envelope")}


def report_dir(experiment: str) -> Path:
    return Path("reports") / experiment


def log(experiment: str, name: str) -> Path:
    return Path("logs") / experiment / f"{name}.log"
