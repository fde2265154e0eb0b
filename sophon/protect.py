"""The Sophon loop (paper Eq. 2–6, Algorithm 1): fine-tuning suppression on the restricted domain
(first-order, outer Adam at α·lr) alternated with normal training reinforcement on the original domain
(Adam at β·lr), with gradient clipping and a rollback when original-domain quality collapses.

Beyond the paper (each a setting; the defaults are the paper's): simulated starts that re-initialise more than the
head, lr schedules in the simulation, inner steps weighted up towards the end of the simulated fine-tune,
releasing the checkpoint that a held-out probe attack finds hardest to fine-tune rather than the last one, and
suppression at depth (`depth`): the Gaussian-kernel MMD between every stage's features of restricted inputs and
Gaussian noise (representation noising, Rosati et al. 2024; sophon.losses.mmd_to_noise), so the early stages an
adversary keeps when it re-initialises the last ones stop carrying the restricted domain's features; or
(`depth.loss: probe`) what a ridge probe reads of the restricted labels from them (sophon.losses.probe_readout).

Out of the basin (`basin`): the same depth loss (`probe` or `mmd`), taken at a point drawn on the line from the
released weights towards the original ones, θ(a) = (1 − a)·θ + a·θ_original with a uniform in [0, reach), and added
to every reinforcement step, so the original model's neighbourhood on the released side stops carrying the
restricted domain too (relearning resistance tracks the distance and linear-mode connectivity to the original
weights, reference-facts; sophon.basin measures them).

`variant_name` says which of these a run used; the model card and the report carry it.

Suppression at depth: `depth.at: released` adds `weight × MMD` of a defender batch at the released weights to every reinforcement step's
loss (one Adam step for the original-domain loss and the depth term together, as representation noising trains its
retain loss and its noise loss; a separate optimiser would be a third objective pulling against the reinforcement).
`adapted` adds it to the suppression loss at the simulation's evaluation points (sophon.simulate), so its
first-order gradient is taken at the adapted weights like the suppression's; `both` does both. Weight 0 (the
default) is the paper: no extra forward pass, no random numbers drawn.

The loop is resumable: with a state folder it saves its full state (weights, both optimisers, the last good
snapshot, every RNG state, the batch position, the history) every `save_every` loops, and resumes from a state
it finds there, ending with the same weights as an uninterrupted run (same machine and thread count)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from sophon.data import ImageSet
from sophon.errors import ConfigError
from sophon.features import STAGE_SELECTIONS, feature_stages, stage_features
from sophon.io import read_state, write_state
from sophon.losses import mmd_to_noise, probe_readout
from sophon.objectives import Objective
from sophon.simulate import FOCUS, START_ALIASES, Adversary, TaskSampler, group_adversaries, run_adversaries
from sophon.train import endless_batches, progress

log = logging.getLogger("sophon.protect")


@dataclass
class ProtectSettings:
    loops: int = 400
    lr: float = 1e-4  # base lr; outer suppression Adam uses alpha·lr, reinforcement Adam beta·lr
    alpha: float = 10.0
    beta: float = 5.0
    tasks_per_loop: int = 1
    inner_steps: int = 20
    persist_loops: int = 1  # outer loops a simulated adversary lives (1: a fresh one every loop, the paper)
    batched: bool = True  # speed only: run adversaries of one optimiser/lr/batch/schedule as one (sophon.simulate)
    eval_every: int = 2
    eval_batch_size: int = 128
    natural_steps: int = 2
    natural_batch_size: int = 128
    clip_norm: float = 0.5
    check_every: int = 25
    rollback_tolerance: float = 10.0  # accuracy points (classification) or relative MSE rise (diffusion)
    save_every: int = 0  # loops between saved states (with a state folder); 0 = never
    step_weighting: str = "uniform"  # or "exponential": later inner steps weigh more (sophon.simulate.step_weights)
    late_weight: float = 1.0  # exponential: the last evaluation point's weight relative to the first
    select: str = "last"  # or "probe"/"redteam": release the check whose probe fine-tunes did worst (worst case)
    probe: dict | list = field(default_factory=lambda: dict(PROBE))  # AttackSettings fields; a list: several probes
    probe_train_samples: int = 0  # defender images each probe fine-tunes on (0: half); the rest score it
    average_from: int = 0  # > 0: release the mean weights of the good checks from this loop on (SWA); 0: the last loop's
    anneal_from: int = 0  # > 0: from this loop on both outer lrs fall by a cosine to anneal_floor × at the last loop
    anneal_floor: float = 0.1
    depth: dict = field(default_factory=lambda: dict(DEPTH))  # suppression at depth; weight 0 = off (the paper)
    basin: dict = field(default_factory=lambda: dict(BASIN))  # the depth loss on the line to the original; 0 = off
    task_space: dict = field(default_factory=lambda: {
        "starts": ["direct", "initFC"], "optimizers": ["adam", "momentum"],
        "lrs": [3e-4, 1e-3, 3e-3], "batch_sizes": [64, 128], "lr_scale": {"momentum": 10.0}})


PROBE = {"strategy": "initFC+all", "optimizer": "adagrad", "lr": 0.01, "batch_size": 100, "epochs": 2,
         "schedule": "constant", "weight_decay": 0.0}
SELECTIONS = ("last", "probe", "redteam")  # redteam: the probes are the red team's held-out attacks
# `at`, not `on`: YAML 1.1 reads on as true
DEPTH = {"weight": 0.0, "stages": "all", "at": "released", "loss": "mmd"}
DEPTH_AT = ("released", "adapted", "both")
DEPTH_LOSSES = ("mmd", "probe")  # mmd: features towards noise (distribution); probe: no linear readout (information)
DEPTH_LOSS_NAMES = {"mmd": "MMD", "probe": "probe readout"}  # in the variant name
DEPTH_SEED = 7919  # the depth term's generator is seeded with seed + DEPTH_SEED: the loop's own draws stay as they were
BASIN = {"weight": 0.0, "reach": 0.5, "loss": "probe"}
BASIN_SEED = 104729  # the basin term's own generator (seed + DEPTH_SEED + BASIN_SEED): nothing else's draws move


def depth_settings(settings: ProtectSettings) -> dict:
    """`settings.depth` over the defaults, checked (ConfigError naming the key)."""
    unknown_keys = set(settings.depth) - set(DEPTH)
    if unknown_keys:
        raise ConfigError(f"sophon.depth: unknown keys {', '.join(sorted(unknown_keys))}; known: {', '.join(DEPTH)}")
    depth = {**DEPTH, **settings.depth}
    if not isinstance(depth["weight"], (int, float)) or depth["weight"] < 0:
        raise ConfigError(f"sophon.depth.weight: {depth['weight']!r} is not a number >= 0")
    if depth["at"] not in DEPTH_AT:
        raise ConfigError(f"sophon.depth.at: {depth['at']!r} is not one of {', '.join(DEPTH_AT)}")
    if depth["stages"] not in STAGE_SELECTIONS:
        raise ConfigError(f"sophon.depth.stages: {depth['stages']!r} is not one of {', '.join(STAGE_SELECTIONS)}")
    if depth["loss"] not in DEPTH_LOSSES:
        raise ConfigError(f"sophon.depth.loss: {depth['loss']!r} is not one of {', '.join(DEPTH_LOSSES)}")
    if depth["weight"] > 0 and depth["at"] != "adapted" and settings.natural_steps == 0:
        raise ConfigError(f"sophon.depth.at: {depth['at']} adds the depth term to the reinforcement steps, and "
                          f"sophon.natural_steps is 0; use at: adapted or natural_steps >= 1")
    return depth


def basin_settings(settings: ProtectSettings) -> dict:
    """`settings.basin` over the defaults, checked (ConfigError naming the key)."""
    unknown_keys = set(settings.basin) - set(BASIN)
    if unknown_keys:
        raise ConfigError(f"sophon.basin: unknown keys {', '.join(sorted(unknown_keys))}; known: {', '.join(BASIN)}")
    basin = {**BASIN, **settings.basin}
    if not isinstance(basin["weight"], (int, float)) or basin["weight"] < 0:
        raise ConfigError(f"sophon.basin.weight: {basin['weight']!r} is not a number >= 0")
    if not isinstance(basin["reach"], (int, float)) or not 0 < basin["reach"] <= 1:
        raise ConfigError(f"sophon.basin.reach: {basin['reach']!r} is not in (0, 1] (the share of the way to the "
                          f"original weights)")
    if basin["loss"] not in DEPTH_LOSSES:
        raise ConfigError(f"sophon.basin.loss: {basin['loss']!r} is not one of {', '.join(DEPTH_LOSSES)}")
    if basin["weight"] > 0 and settings.natural_steps == 0:
        raise ConfigError("sophon.basin.weight: the basin term is added to the reinforcement steps, and "
                          "sophon.natural_steps is 0")
    return basin


def anneal_factor(loop: int, settings: ProtectSettings) -> float:
    """The outer lrs' multiplier during `loop` (1-based): 1 up to `anneal_from`, then a cosine down to `anneal_floor`
    at the last loop. Both the suppression and the reinforcement steps shrink, so the released weights settle where
    the two objectives balance, not wherever the last full-size step of either left them."""
    start, floor = settings.anneal_from, settings.anneal_floor
    if not start or loop <= start:
        return 1.0
    done = min(1.0, (loop - start) / (settings.loops - start))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


class BasinTerm:
    """The depth loss (DepthTerm) at a point of the line from the weights to the original ones: θ(a) = (1 − a)·θ +
    a·θ_original, a uniform in [0, reach) from the term's own generator, so the gradient reaches θ with a factor
    1 − a. θ_original: the model's parameters when the term is made (protect makes it before any step or resume).
    Buffers: the model's own, copied (no batch-norm statistics move)."""

    def __init__(self, model: torch.nn.Module, objective: Objective, basin: dict, seed: int):
        if basin["loss"] == "probe" and not objective.higher_is_better:  # the diffusion objective: lower is better
            raise ConfigError("sophon.basin.loss: probe reads class labels; a diffusion objective has none (use mmd)")
        self.depth = DepthTerm(model, objective, {**DEPTH, "loss": basin["loss"]}, seed + BASIN_SEED)
        self.model, self.weight, self.reach = model, float(basin["weight"]), float(basin["reach"])
        self.generator = self.depth.generator
        self.original = {name: p.detach().clone() for name, p in model.named_parameters()}

    def point(self, a: float) -> dict[str, torch.Tensor]:
        return {**{name: (1 - a) * p + a * self.original[name] for name, p in self.model.named_parameters()},
                **{name: b.detach().clone() for name, b in self.model.named_buffers()}}

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        a = float(torch.rand((), generator=self.generator)) * self.reach
        return self.depth(images, self.point(a), labels)


class DepthTerm:
    """A loss on the model's stage features of restricted inputs (sophon.features.stage_features): `mmd`, their MMD²
    to Gaussian noise (sophon.losses.mmd_to_noise), or `probe`, what a linear probe reads of the labels from them
    (sophon.losses.probe_readout; classification only). `term(images, params, labels)` at the weights `params`
    (parameters and buffers by name; None: the model's own parameters with a copy of its buffers, so no batch-norm
    statistics move). The inputs (a diffusion batch's noise and timesteps) and the noise come from the term's own
    generator."""

    def __init__(self, model: torch.nn.Module, objective: Objective, depth: dict, seed: int):
        self.model, self.objective = model, objective
        self.weight = float(depth["weight"])
        self.loss = depth["loss"]
        if self.loss == "probe" and not objective.higher_is_better:  # the diffusion objective: lower is better
            raise ConfigError("sophon.depth.loss: probe reads class labels; a diffusion objective has none (use mmd)")
        self.stages = feature_stages(model, depth["stages"])
        self.generator = torch.Generator().manual_seed(seed + DEPTH_SEED)

    def __call__(self, images: torch.Tensor, params: dict[str, torch.Tensor] | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if params is None:
            params = {**dict(self.model.named_parameters()),
                      **{name: b.detach().clone() for name, b in self.model.named_buffers()}}
        inputs = self.objective.model_inputs(images, self.generator)
        features = stage_features(self.model, inputs, params, self.stages)
        if self.loss == "probe":
            if labels is None:
                raise ValueError("the probe depth term reads labels: call it with the batch's labels")
            return probe_readout(features, labels)
        return mmd_to_noise(features, self.generator)


PAPER_LOSSES = ("ice", "klu", "neg_ce", "dos", "neg_mse")  # the paper's suppression losses and naive baselines


# Settings of the loop's strength that a variant may change from the experiment's paper settings (named if so).
STRENGTH = {"alpha": "α", "beta": "β", "inner_steps": "inner steps", "natural_steps": "reinforcement steps",
            "loops": "loops", "rollback_tolerance": "rollback tolerance"}


def variant_name(settings: ProtectSettings, suppress_timesteps: list[int] | None = None,
                 suppression: str | None = None, paper: dict | None = None) -> str:
    """`paper` for the paper's Sophon, else `paper + <each change>`: what the card and the report name. `paper`: the
    experiment's paper settings (its `ablation.variants.paper`); the strength settings that differ are named."""
    starts = {START_ALIASES.get(s, s) for s in settings.task_space.get("starts", [])}
    changes = [f"{suppression} suppression"] if suppression and suppression not in PAPER_LOSSES else []
    for key, label in STRENGTH.items():
        value = getattr(settings, key)
        if paper and key in paper and value != paper[key] and not (key == "alpha" and value == 0):
            changes.append(f"{label} {value:g} (paper {paper[key]:g})")
    if settings.alpha == 0:
        changes.append("no suppression step (α 0: the reinforcement alone, a control)")
    depth = {**DEPTH, **settings.depth}
    if starts - {"direct+all", "initFC+all"}:
        changes.append("starts " + "/".join(sorted(starts - {"direct+all", "initFC+all"})))
    if set(settings.task_space.get("optimizers", [])) - {"adam", "momentum"}:
        changes.append("optimizers " + "/".join(sorted(set(settings.task_space["optimizers"]) - {"adam", "momentum"})))
    paper_space = (paper or {}).get("task_space", {})
    for key, label in (("lrs", "adversary lrs"), ("batch_sizes", "adversary batches")):
        if key in paper_space and sorted(settings.task_space.get(key, [])) != sorted(paper_space[key]):
            changes.append(f"{label} {'/'.join(f'{v:g}' for v in sorted(settings.task_space[key]))} "
                           f"(paper {'/'.join(f'{v:g}' for v in sorted(paper_space[key]))})")
    if settings.task_space.get("shrink_perturb"):
        changes.append("shrink-and-perturbed starts " + "/".join(
            f"{float(sp['shrink']):g}:{float(sp['perturb']):g}" for sp in settings.task_space["shrink_perturb"]))
    if set(settings.task_space.get("schedules", ["constant"])) - {"constant"}:
        changes.append("scheduled inner lrs")
    focus = {**FOCUS, **(settings.task_space.get("focus") or {})}
    if float(focus["share"]) > 0:
        changes.append(f"focus {float(focus['share']):g} (replays of the {focus['top']} strongest of the last "
                       f"{focus['window']} adversaries)")
    if settings.step_weighting != "uniform" and settings.late_weight != 1.0:
        changes.append(f"{settings.step_weighting} step weights ×{settings.late_weight:g}")
    if settings.persist_loops > 1:
        changes.append(f"adversaries persist {settings.persist_loops} loops")
    if settings.select != "last":
        on = f" (probes on {settings.probe_train_samples} images)" if settings.probe_train_samples else ""
        changes.append(f"{settings.select}-selected checkpoint{on}")
    if settings.average_from:
        changes.append(f"weights averaged over checks from loop {settings.average_from}")
    if settings.anneal_from:
        changes.append(f"outer lrs annealed from loop {settings.anneal_from} to ×{settings.anneal_floor:g}")
    if depth["weight"] > 0:
        where = {"released": "", "adapted": " at adapted weights", "both": " at released and adapted weights"}
        stages = "" if depth["stages"] == "all" else f" on {depth['stages']} stages"
        kind = DEPTH_LOSS_NAMES.get(depth["loss"], depth["loss"])
        changes.append(f"depth {kind} ×{depth['weight']:g}{stages}{where.get(depth['at'], ' ' + str(depth['at']))}")
    basin = {**BASIN, **settings.basin}
    if basin["weight"] > 0:
        kind = DEPTH_LOSS_NAMES.get(basin["loss"], basin["loss"])
        changes.append(f"basin {kind} ×{basin['weight']:g} on the line to the original weights (a < {basin['reach']:g})")
    if suppress_timesteps is not None and list(suppress_timesteps) != [0, 1000]:  # 1,000: the DDPM's steps
        changes.append(f"suppression on t in [{suppress_timesteps[0]}, {suppress_timesteps[1]})")
    return " + ".join(["paper", *changes])


@dataclass
class ProtectHistory:
    loop: list[int] = field(default_factory=list)
    suppression_loss: list[float] = field(default_factory=list)
    normal_loss: list[float] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)  # {"loop", "quality", "rolled_back"}
    rollbacks: int = 0
    nonfinite: int = 0  # loops whose suppression loss was NaN/inf (their update is skipped)
    probes: list[dict] = field(default_factory=list)  # {"loop", "score"}: the probe attack at each good check
    selected_loop: int | None = None  # the loop whose weights were released
    averaged_loops: list[int] = field(default_factory=list)  # average_from: the checks whose mean was released
    depth_loss: list[float] = field(default_factory=list)  # depth MMD at the released weights (reinforcement steps)
    adapted_depth_loss: list[float] = field(default_factory=list)  # depth MMD at the adapted weights
    basin_loss: list[float] = field(default_factory=list)  # the basin term (reinforcement steps), per loop
    focus: dict = field(default_factory=dict)  # task_space focus: replays and the strongest adversaries at the end


def protect(model: torch.nn.Module, objective: Objective, defender: ImageSet, original_train: ImageSet,
            original_val: ImageSet, settings: ProtectSettings, *, seed: int, device: torch.device,
            on_check: Callable[[dict], None] | None = None, state_dir: Path | None = None,
            state_key: str = "") -> ProtectHistory:
    """Protect `model` in place against fine-tuning on `defender`'s domain and return the loss history. A state in
    `state_dir` saved under the same `state_key` (what determines the run: settings, seed, start model, data) is
    resumed; a state of another key is ignored and overwritten."""
    rng = random.Random(seed)
    sampler = TaskSampler(settings.task_space, rng)
    generator = torch.Generator().manual_seed(seed)
    suppress_opt = torch.optim.Adam(model.parameters(), lr=settings.alpha * settings.lr)
    normal_opt = torch.optim.Adam(model.parameters(), lr=settings.beta * settings.lr)
    normal_batches = endless_batches(original_train, settings.natural_batch_size, generator)

    if settings.select not in SELECTIONS:
        raise ConfigError(f"sophon.select: {settings.select!r} is not one of {', '.join(SELECTIONS)}")
    if settings.average_from and settings.select != "last":
        raise ConfigError(f"sophon.average_from: {settings.average_from} averages the checks, and sophon.select: "
                          f"{settings.select} picks one; use one of them")
    if settings.anneal_from and not 0 < settings.anneal_from < settings.loops:
        raise ConfigError(f"sophon.anneal_from: {settings.anneal_from} is not before the last loop "
                          f"(sophon.loops: {settings.loops})")
    if not 0 < settings.anneal_floor <= 1:
        raise ConfigError(f"sophon.anneal_floor: {settings.anneal_floor!r} is not in (0, 1]")
    if settings.average_from > settings.loops:
        raise ConfigError(f"sophon.average_from: {settings.average_from} is past the last loop "
                          f"(sophon.loops: {settings.loops})")
    # LambdaLR's step count is the loops done: during loop L it holds L - 1.
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, lambda done: anneal_factor(done + 1, settings))
                 for opt in (suppress_opt, normal_opt)] if settings.anneal_from else []
    # Batch-norm statistics are not averaged: they are recomputed for the mean weights at the end (as SWA does).
    averaged = AveragedModel(model, use_buffers=False) if settings.average_from else None
    probe = (Probe(settings.probe, objective, defender, seed=seed, device=device,
                   train_samples=settings.probe_train_samples) if settings.select != "last" else None)
    depth = depth_settings(settings)
    term = DepthTerm(model, objective, depth, seed) if depth["weight"] > 0 else None
    on_released = term is not None and depth["at"] in ("released", "both")
    on_adapted = term is not None and depth["at"] in ("adapted", "both")
    depth_batches = endless_batches(defender, settings.natural_batch_size, term.generator) if on_released else None
    basin = basin_settings(settings)
    line = BasinTerm(model, objective, basin, seed) if basin["weight"] > 0 else None  # before a resume: θ_original
    basin_batches = endless_batches(defender, settings.natural_batch_size, line.generator) if line is not None else None
    best: dict | None = None  # the probe-selected weights: {"loop", "score", "model"}

    saved = read_state(state_dir) if state_dir is not None else None
    if saved is not None and saved["key"] == state_key:
        model.load_state_dict(saved["model"])
        suppress_opt.load_state_dict(saved["suppress_opt"])
        normal_opt.load_state_dict(saved["normal_opt"])
        for schedule, state in zip(schedules, saved.get("schedules", [])):
            schedule.load_state_dict(state)
        last_good = (saved["last_good"]["model"], saved["last_good"]["optimizers"])
        torch.set_rng_state(saved["torch_rng"])
        generator.set_state(saved["generator"])
        rng.setstate(saved["rng"])
        normal_batches.restore(saved["normal_batches"])
        if term is not None:
            term.generator.set_state(saved["depth_generator"])
        if depth_batches is not None:
            depth_batches.restore(saved["depth_batches"])
        if line is not None:
            line.generator.set_state(saved["basin_generator"])
            basin_batches.restore(saved["basin_batches"])
        reference, history, first = saved["reference"], ProtectHistory(**saved["history"]), saved["loop"] + 1
        best = saved.get("best")
        sampler.restore(saved.get("sampler", {}))
        if averaged is not None:
            averaged.load_state_dict(saved["averaged"])
        log.info("resumed from the state saved after loop %d", saved["loop"])
    else:
        history, first = ProtectHistory(), 1
        reference = objective.quality(model, original_val, device)
        last_good = _snapshot(model, suppress_opt, normal_opt)
        history.checks.append({"loop": 0, "quality": reference, "rolled_back": False})
        log.info("start: original-domain quality %.4g", reference)

    def save(loop: int) -> None:
        write_state(state_dir, {
            "key": state_key, "loop": loop, "model": model.state_dict(), "suppress_opt": suppress_opt.state_dict(),
            "normal_opt": normal_opt.state_dict(), "last_good": {"model": last_good[0], "optimizers": last_good[1]},
            "torch_rng": torch.get_rng_state(), "generator": generator.get_state(), "rng": rng.getstate(),
            "normal_batches": normal_batches.state(), "reference": reference, "history": dataclasses.asdict(history),
            **({"best": best} if best is not None else {}),
            **({"schedules": [schedule.state_dict() for schedule in schedules]} if schedules else {}),
            **({"sampler": sampler.state()} if sampler.recent else {}),
            **({"averaged": averaged.state_dict()} if averaged is not None else {}),
            **({"depth_generator": term.generator.get_state()} if term is not None else {}),
            **({"depth_batches": depth_batches.state()} if depth_batches is not None else {}),
            **({"basin_generator": line.generator.get_state(), "basin_batches": basin_batches.state()}
               if line is not None else {})})

    def new_adversary() -> Adversary:
        order = torch.randperm(len(defender), generator=generator)
        half = len(order) // 2
        return Adversary(model, objective, sampler.draw(), defender.subset(order[:half]),
                         defender.subset(order[half:]), total_steps=settings.inner_steps * settings.persist_loops,
                         eval_batch_size=settings.eval_batch_size, generator=generator,
                         depth=term if on_adapted else None)

    bar = progress(range(first, settings.loops + 1), initial=first - 1, total=settings.loops, desc="protect",
                   unit="loop")
    adversaries: list = []  # the runners: an Adversary, or several as one sophon.simulate.AdversaryBatch
    for loop in bar:
        # Fine-tuning suppression: each adversary splits the defender data afresh into fine-tune / eval halves.
        # With persist_loops > 1 the adversaries of loop 1, 1 + persist_loops, ... fine-tune on for that many loops.
        model.train()
        if (loop - 1) % settings.persist_loops == 0 or not adversaries:
            created = [new_adversary() for _ in range(settings.tasks_per_loop)]  # results come in this order
            adversaries = group_adversaries(created, settings.batched)
        total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        losses, adapted_depth = [], []
        for adversary, result in zip(created, run_adversaries(adversaries, settings.inner_steps, settings.eval_every,
                                                              settings.step_weighting, settings.late_weight)):
            sampler.record(adversary.task, result.final_suppression_loss)
            for name, grad in result.grads.items():
                total[name] += grad / settings.tasks_per_loop
            losses.append(result.suppression_loss)
            adapted_depth.append(result.depth_loss)
        suppression = sum(losses) / len(losses)
        if settings.alpha == 0:
            pass  # the control: the adversaries are simulated (their suppression loss is logged), nothing is suppressed
        elif all(torch.isfinite(g).all() for g in total.values()) and torch.isfinite(torch.tensor(suppression)):
            suppress_opt.zero_grad(set_to_none=True)
            for name, p in model.named_parameters():
                p.grad = total[name]
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_norm)
            suppress_opt.step()
        else:
            history.nonfinite += 1

        # Normal training reinforcement on the original domain.
        # With depth on the released weights, each step also pushes the stage features of a defender batch
        # towards noise (one loss, one Adam step).
        normal, released_depth, basin_loss = 0.0, 0.0, 0.0
        for _ in range(settings.natural_steps):
            images, labels = next(normal_batches)
            loss = objective.finetune_loss(model, images, labels, generator)
            total_loss = loss
            if on_released:
                depth_images, depth_labels = next(depth_batches)
                mmd = term(depth_images, labels=depth_labels)
                released_depth += mmd.item() / settings.natural_steps
                total_loss = total_loss + term.weight * mmd
            if line is not None:
                basin_images, basin_labels = next(basin_batches)
                on_line = line(basin_images, basin_labels)
                basin_loss += on_line.item() / settings.natural_steps
                total_loss = total_loss + line.weight * on_line
            normal_opt.zero_grad(set_to_none=True)
            total_loss.backward()
            normal_opt.step()
            normal += loss.item() / settings.natural_steps

        history.loop.append(loop)
        history.suppression_loss.append(suppression)
        history.normal_loss.append(normal)
        if on_released:
            history.depth_loss.append(released_depth)
        if on_adapted:
            history.adapted_depth_loss.append(sum(adapted_depth) / len(adapted_depth))
        if line is not None:
            history.basin_loss.append(basin_loss)
        bar.set_postfix(suppress=f"{suppression:.3g}", normal=f"{normal:.3g}")

        if loop % settings.check_every == 0 or loop == settings.loops:
            quality = objective.quality(model, original_val, device)
            collapsed = _collapsed(objective, quality, reference, settings.rollback_tolerance)
            if collapsed:
                _restore(model, suppress_opt, normal_opt, last_good)
                adversaries = []  # they followed the weights that collapsed
                history.rollbacks += 1
                log.warning("rollback at loop %d: original-domain quality %.4g is past the tolerance %.3g from "
                            "the start (%.4g); restored the state of the last good check", loop, quality,
                            settings.rollback_tolerance, reference)
            else:
                last_good = _snapshot(model, suppress_opt, normal_opt)
                if averaged is not None and loop >= settings.average_from:
                    averaged.update_parameters(model)
                    history.averaged_loops.append(loop)
                if probe is not None:
                    score = probe(model)
                    history.probes.append({"loop": loop, "score": score})
                    if best is None or probe.better_for_defender(score, best["score"]):
                        best = {"loop": loop, "score": score, "model": copy.deepcopy(model.state_dict())}
            check = {"loop": loop, "quality": quality, "rolled_back": collapsed, "suppression_loss": suppression}
            history.checks.append(check)
            if on_check is not None:
                on_check(check)
        for schedule in schedules:  # after a rollback too: the restored optimisers' lrs are the snapshot's
            schedule.step()
        # A state is saved only where no adversary lives on (it is not part of the state).
        if (state_dir is not None and settings.save_every and loop % settings.save_every == 0
                and loop % settings.persist_loops == 0 and loop < settings.loops):
            save(loop)
    history.selected_loop = settings.loops
    if sampler.share > 0:
        history.focus = sampler.summary()
    if best is not None:
        model.load_state_dict(best["model"])
        history.selected_loop = best["loop"]
        log.info("released the weights of loop %d (probe score %.4g)", best["loop"], best["score"])
    if averaged is not None and history.averaged_loops:
        release_average(model, averaged, objective, original_train, settings.natural_batch_size)
        history.selected_loop = None
        log.info("released the mean weights of the checks at loops %s: original-domain quality %.4g",
                 history.averaged_loops, objective.quality(model, original_val, device))
    return history


@torch.no_grad()
def release_average(model: torch.nn.Module, averaged: AveragedModel, objective: Objective, original_train: ImageSet,
                    batch_size: int) -> None:
    """Load `averaged`'s mean parameters into `model` and recompute its batch-norm statistics on the original
    domain's training data (torch's update_bn; a model without batch norm keeps its buffers)."""
    for mean, p in zip(averaged.module.parameters(), model.parameters(), strict=True):
        p.copy_(mean)
    generator = torch.Generator().manual_seed(0)
    batches = (objective.model_inputs(original_train.images[start:start + batch_size], generator)
               for start in range(0, len(original_train), batch_size))  # lazy: update_bn reads none without BN
    update_bn(batches, model)


class Probe:
    """Held-out attacks run at every good check (`select: probe` or `redteam`): each a short fine-tune of a copy of
    the model on one half of the defender's data (or on `train_samples` images, as few as the attacker has), scored
    on the rest (mean quality over its epochs, as the lr sweep scores); the score of a check is the worst case for the
    defender over the probes (the best attacker's)."""

    def __init__(self, spec: dict | list[dict], objective: Objective, defender: ImageSet, *, seed: int,
                 device: torch.device, train_samples: int = 0):
        from sophon.attacks import AttackSettings

        specs = [spec] if isinstance(spec, dict) else list(spec)
        if not specs:
            raise ConfigError("sophon.probe: no probe attack")
        for one in specs:
            unknown_keys = set(one) - {f.name for f in dataclasses.fields(AttackSettings)}
            if unknown_keys:
                raise ConfigError(f"sophon.probe: unknown keys {', '.join(sorted(unknown_keys))}")
        self.settings = [AttackSettings(**one) for one in specs]
        self.objective, self.seed, self.device = objective, seed, device
        if not 0 <= train_samples < len(defender):
            raise ConfigError(f"sophon.probe_train_samples: {train_samples} is not in [0, {len(defender)}) (the "
                              f"defender's images; 0 = half)")
        order = torch.randperm(len(defender), generator=torch.Generator().manual_seed(seed + 1))
        cut = train_samples or len(order) // 2
        self.train, self.test = defender.subset(order[:cut]), defender.subset(order[cut:])

    def __call__(self, model: torch.nn.Module) -> float:
        from sophon.attacks import finetune, sweep_score

        scores = []
        for settings in self.settings:
            with torch.random.fork_rng(devices=[]):
                curve = finetune(copy.deepcopy(model), self.train, self.test, settings, seed=self.seed,
                                 device=self.device, objective=self.objective)
            scores.append(sweep_score(curve))
        return max(scores) if self.objective.higher_is_better else min(scores)

    def better_for_defender(self, score: float, than: float) -> bool:
        """Lower restricted accuracy (classification) or higher MSE (diffusion) after the probe is better."""
        return score < than if self.objective.higher_is_better else score > than


def _collapsed(objective: Objective, quality: float, reference: float, tolerance: float) -> bool:
    if quality != quality:  # NaN
        return True
    if objective.higher_is_better:
        return quality < reference - tolerance
    return quality > reference * (1 + tolerance)


def _snapshot(model, *optimizers):
    return (copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers])


def _restore(model, suppress_opt, normal_opt, snapshot):
    """Set the model and optimisers to a snapshot's values. The optimisers get a copy: `Optimizer.load_state_dict`
    keeps the tensors it is given, so without one every later step would also rewrite the snapshot (and a saved state
    would hold two names for one tensor)."""
    state, optimizer_states = snapshot
    model.load_state_dict(state)
    for optimizer, saved in zip((suppress_opt, normal_opt), optimizer_states):
        optimizer.load_state_dict(copy.deepcopy(saved))
