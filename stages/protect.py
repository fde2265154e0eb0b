"""Stage `protect`: Sophon (paper Algorithm 1) for either task: fine-tuning suppression after simulated
fine-tuning on the defender's half (ICE/KLU for a classifier, DoS for a diffusion UNet), alternated with normal
training reinforcement on the original domain (sophon.protect, one loop for both). The protected model is saved as
the project's checkpoint and released in its ecosystem's format (models/<experiment>/sophon/release: timm or
diffusers), which MLflow keeps with the run that registers it.

    python -m stages.protect --experiment quick-classification
"""

import copy
import dataclasses
import shutil
import time

from sophon import layout
from sophon.basin import connectivity
from sophon.errors import ConfigError
from sophon.features import feature_stages, stage_readout
from sophon.io import config_hash, write_json
from sophon.protect import ProtectSettings, protect, variant_name
from sophon.tasks import load_model, new_model, task_of
from sophon.tracking import stage_run
from sophon.train import seed_everything
from stages.common import parser, parts, run, setup, split_digests


def protect_settings(exp: dict, **changes) -> ProtectSettings:
    """ProtectSettings from the experiment's `sophon` section (with `changes` on top, e.g. an ablation's). With
    `select: redteam` the probes are the red-team suite's held-out attacks, `probe_epochs` epochs each."""
    cfg = {**exp["sophon"], **changes}
    fields = {f.name for f in dataclasses.fields(ProtectSettings)}
    values = {k: v for k, v in cfg.items() if k in fields}
    if cfg.get("select") == "redteam":
        values["probe"] = redteam_probes(exp, cfg.get("probe_epochs", 2))
    return ProtectSettings(**values)


def protect_variant(exp: dict, settings: ProtectSettings, cfg: dict) -> str:
    """The variant name of `settings` (from the `sophon` settings `cfg`), against the experiment's paper settings: its
    `ablation.variants.paper` over its `sophon` section, so a setting the paper row inherits is compared too. A protect
    seed other than the paper's is named."""
    row = ((exp.get("ablation") or {}).get("variants") or {}).get("paper")
    paper = None if row is None else {**exp["sophon"], **row}
    name = variant_name(settings, cfg.get("suppress_timesteps"), cfg["suppression"], paper)
    if paper is not None and cfg.get("seed", paper.get("seed")) != paper.get("seed"):
        name += f" + protect seed {cfg['seed']} (paper {paper['seed']})"
    return name


def redteam_probes(exp: dict, epochs: int) -> list[dict]:
    """The red team's held-out attacks as release-selection probes: the same settings, `epochs` epochs."""
    attacks = (exp.get("redteam") or {}).get("attacks", {})
    probes = [{**{k: v for k, v in spec.items() if k != "held_out"}, "epochs": epochs}
              for spec in attacks.values() if spec.get("held_out")]
    if not probes:
        raise ConfigError(f"experiments.{exp['name']}.sophon.select: redteam needs red-team attacks with held_out: "
                          f"true (experiments.{exp['name']}.redteam.attacks)")
    return probes


def restricted_readout(exp: dict, released, original_weights: dict, restricted_test, device) -> dict:
    """What a linear probe reads of the restricted labels at each stage (sophon.features.stage_readout): a random
    init (the scratch start, seed 0), the original and the release."""
    original = copy.deepcopy(released)
    original.load_state_dict(original_weights)
    return {"stages": feature_stages(released),
            **{name: stage_readout(m, restricted_test, device) for name, m in (
                ("random_init", new_model(exp, 0, device)), ("original", original), ("released", released))}}


def main() -> None:
    args = parser(__doc__).parse_args()
    exp, device = setup(args)
    task, cfg, name = task_of(exp), exp["sophon"], exp["name"]
    original_train, original_val, original_test, defender, restricted_test = parts(
        exp, "original_train", "original_val", "original_test", "defender", "restricted_test")
    model, card = load_model(exp, "original", device)
    seed_everything(cfg["seed"])
    original_weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    settings = protect_settings(exp)
    # A killed run resumes from its last saved state when nothing that determines the run has changed.
    # `batched` is speed only: a state saved with it on resumes with it off and the other way round.
    determining = {k: v for k, v in dataclasses.asdict(settings).items() if k != "batched"}
    state_key = config_hash({"settings": determining, "seed": cfg["seed"], "task": exp["task"],
                             "start": card["weights_sha256"], "data": split_digests(exp)})
    state_dir = layout.protect_state(name)
    objective = task.objective(exp, device)
    quality = "accuracy" if objective.higher_is_better else "mse"
    began = time.perf_counter()
    with stage_run("protect", name, params={"sophon": cfg}) as tracked:
        def on_check(point):
            tracked.log_metrics({f"original_val_{quality}": point["quality"],
                                 "suppression_loss": point["suppression_loss"],
                                 "rolled_back": int(point["rolled_back"])}, step=point["loop"])

        history = protect(model, objective, defender, original_train, original_val, settings, seed=cfg["seed"],
                          device=device, on_check=on_check, state_dir=state_dir, state_key=state_key)
        metrics = {f"original_test_{quality}": objective.quality(model, original_test, device),
                   f"restricted_test_{quality}": objective.quality(model, restricted_test, device)}
        seconds = time.perf_counter() - began
        # How far the release sits from the original's basin: the loss along the line between the two weights.
        basin = connectivity(model, original_weights, objective, restricted_test, original_test)
        readout = (restricted_readout(exp, model, original_weights, restricted_test, device)
                   if task.name == "classification" else None)
        tracked.log_metrics({**metrics, "rollbacks": history.rollbacks, "nonfinite_loops": history.nonfinite,
                             "seconds": seconds, "basin_barrier_restricted": basin["restricted"]["barrier"],
                             "basin_barrier_original": basin["original"]["barrier"],
                             "basin_distance_relative": basin["distance"]["relative"]})
        write_json(layout.history(name, "sophon"), {"settings": dataclasses.asdict(settings),
                                                    **dataclasses.asdict(history), **metrics, "seconds": seconds,
                                                    "basin": basin, **({"readout": readout} if readout else {})})
        variant = protect_variant(exp, settings, cfg)
        tracked.set_tag("sophon.variant", variant)
        task.save(model, exp, "sophon", "sophon", {**metrics, "suppression": cfg["suppression"], "variant": variant,
                                                   "selected_loop": history.selected_loop,
                                                   **({"averaged_loops": history.averaged_loops}
                                                      if history.averaged_loops else {}),
                                                   "protect_settings": dataclasses.asdict(settings)})
        tracked.log_artifact(layout.model_dir(name, "sophon") / layout.CARD)
        # The same weights in timm's / diffusers' own format (models/<experiment>/sophon/release), kept with the run
        # that registers the model.
        task.release(model, exp, "sophon")
        tracked.log_artifacts(layout.release_dir(name, "sophon"), "release")
        # The released model in MLflow's registry: a new version of `sophon-<experiment>` per protect run.
        version = tracked.log_checkpoint(layout.model_dir(name, "sophon"), f"sophon-{name}")
        tracked.set_tag("sophon.registered_version", version)
    shutil.rmtree(state_dir, ignore_errors=True)  # the outputs are complete: nothing to resume
    released = (f"mean weights of the checks at loops {history.averaged_loops}" if history.averaged_loops
                else f"weights of loop {history.selected_loop}")
    print(f"Sophon model ({variant}, {released}): "
          + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f", {history.rollbacks} rollbacks ({seconds:.0f} s)")


if __name__ == "__main__":
    run(main)
