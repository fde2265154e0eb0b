"""Fine-tuning simulation (paper §4.1): run an adversary's fine-tune functionally and collect the
first-order gradient of the aggregated suppression loss (Eq. 4–5).

The model module is never trained: adapted weights live in a dict of tensors that real torch.optim
optimisers update, and `torch.func.functional_call` runs the module with them. BatchNorm running
statistics are cloned into that dict too, so the simulation never touches the model's own buffers.

A simulated start is a fine-tuning strategy of sophon.strategies (the attack search's names): `direct+all`,
`initFC+all`, `initFC+FC`, `reinit<k>+all`, `reinit_up+all`, `lora`. What a strategy re-initialises gets fresh values
and no suppression gradient (a fresh tensor's gradient says nothing about the released one); what it freezes
is not updated. The paper's two starts are `direct` and `initFC` (accepted as aliases). A `lora` adversary runs a
replica with peft's adapters injected (sophon.strategies, rank `lora_rank`): only the adapters train, and the
suppression gradient is taken at the frozen base weights, which is the first-order gradient at W + BA. A start may
also be shrunk and perturbed as the search's attacker does it (`shrink`, `perturb`; task_space `shrink_perturb`):
the adversary starts at shrink·θ + perturb·θ_fresh, and the first-order gradient at θ is `shrink` times the one
taken there.

Suppression at depth at the adapted weights (`sophon.protect.DepthTerm`, `depth.at: adapted`): at each evaluation
point the depth term of the same held-out batch, taken at the adapted weights (with a copy of their buffers, so the
simulation's batch-norm statistics are not touched), is added to the suppression loss before the first-order
gradient is taken. Off (None), nothing else runs.

Several adversaries at once (`AdversaryBatch`, `run_adversaries`): adversaries that train the same tensors with the
same optimiser, lr, batch size, schedule and horizon are stacked, every parameter and buffer a [K, ...] tensor, and
one forward pass computes their K losses; the sum of the K losses gives each its own gradient in its slice, and one
optimiser over the stacked tensors makes K independent updates, since every optimiser of sophon.optim is elementwise
with scalar hyperparameters (`optim.ELEMENTWISE`; the simulation clips nothing). Batch-norm running statistics are
stacked buffers, updated per slice. The forward pass is the network folded K-fold along its channels (`sophon.fold`:
grouped convolutions, K·C-channel batch norms; views of the stacked tensors), or `torch.func.vmap` over
`functional_call` (`engine="vmap"`: any network, but measured slower than one at a time on CPU, so protect uses the
fold only). A group needs a foldable network, an objective whose losses draw no random numbers (classification;
diffusion draws noise inside the loss) and no depth term; the others run one at a time. Each adversary's batches are
drawn before any runs, in the order the one-at-a-time path draws them, so both paths see the same batches and give
the same results to float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
from dataclasses import dataclass, replace

import torch
from torch.func import functional_call, vmap

from sophon.data import ImageSet
from sophon.errors import ConfigError
from sophon.fold import fold_model, fold_plan, fold_tensors, foldable
from sophon.objectives import Objective
from sophon.optim import ELEMENTWISE, make_optimizer, make_schedule
from sophon.train import endless_batches

START_ALIASES = {"direct": "direct+all", "initFC": "initFC+all"}  # the paper's names
FOCUS = {"share": 0.0, "top": 5, "window": 40}  # task_space `focus` (TaskSampler); share 0 = off
STEP_WEIGHTINGS = ("uniform", "exponential")
_created = itertools.count()  # the order adversaries were made in (run_adversaries draws their batches in it)


@dataclass(frozen=True)
class SimulatedTask:
    """One sampled fine-tuning environment: start strategy, optimiser, lr, batch size, lr schedule."""

    start: str  # a sophon.strategies name (or a paper alias)
    optimizer: str
    lr: float
    batch_size: int
    schedule: str = "constant"
    seed: int = 0  # the start's re-initialisation
    lora_rank: int = 4  # a lora start's adapter rank
    shrink: float = 1.0  # shrink-and-perturb of the trained, not re-initialised weights (1.0/0.0 = off)
    perturb: float = 0.0


def sample_task(space: dict, rng: random.Random) -> SimulatedTask:
    """Draw a task from the configured sets; `lr_scale` multiplies lrs per optimiser (SGD needs larger ones).
    With `shrink_perturb` settings, a start is prepared by one of them or by none, each equally likely (drawn
    last, so a space without them draws what it always drew)."""
    optimizer = rng.choice(space["optimizers"])
    scale = space.get("lr_scale", {}).get(optimizer, 1.0)
    task = SimulatedTask(start=rng.choice(space["starts"]), optimizer=optimizer,
                         lr=rng.choice(space["lrs"]) * scale, batch_size=rng.choice(space["batch_sizes"]),
                         schedule=rng.choice(space.get("schedules", ["constant"])), seed=rng.randrange(2**31),
                         lora_rank=space.get("lora_rank", 4))
    if space.get("shrink_perturb"):
        chosen = rng.choice([None, *space["shrink_perturb"]])
        if chosen is not None:
            task = replace(task, shrink=float(chosen["shrink"]), perturb=float(chosen["perturb"]))
    return task


class TaskSampler:
    """Draws the simulated adversaries' tasks: each from the configured sets (`sample_task`), or, with task_space
    `focus` {share, top, window}, a `share` of them replayed from the strongest recent ones. Strength is an
    adversary's suppression loss after its fine-tune (the defender minimises it: the higher, the more the adversary
    recovered); a replay draws one of the `top` strongest of the last `window` adversaries and runs its configuration
    (start, optimiser, lr, batch, schedule, shrink-and-perturb) again with a fresh seed. The simulation then spends
    its loops on the adversaries the release is currently weakest against, as the attack search does with its trials,
    and not on the broad mix's easy ones. Off (share 0), it draws exactly what `sample_task` always drew."""

    def __init__(self, space: dict, rng: random.Random):
        focus = {**FOCUS, **(space.get("focus") or {})}
        self.space, self.rng = space, rng
        self.share, self.top, self.window = float(focus["share"]), int(focus["top"]), int(focus["window"])
        self.recent: list[tuple[SimulatedTask, float]] = []  # (task, strength), oldest first
        self.replays = 0

    def strongest(self) -> list[tuple[SimulatedTask, float]]:
        return sorted(self.recent, key=lambda item: item[1], reverse=True)[:self.top]

    def draw(self) -> SimulatedTask:
        if self.share > 0 and len(self.recent) >= self.top and self.rng.random() < self.share:
            self.replays += 1
            return replace(self.rng.choice(self.strongest())[0], seed=self.rng.randrange(2**31))
        return sample_task(self.space, self.rng)

    def record(self, task: SimulatedTask, strength: float) -> None:
        if self.share > 0 and math.isfinite(strength):
            self.recent.append((task, strength))
            del self.recent[:-self.window]

    def state(self) -> dict:
        return {"replays": self.replays,
                "recent": [{"task": dataclasses.asdict(task), "strength": strength} for task, strength in self.recent]}

    def restore(self, state: dict) -> None:
        self.replays = int(state.get("replays", 0))
        self.recent = [(SimulatedTask(**item["task"]), float(item["strength"])) for item in state.get("recent", [])]

    def summary(self) -> dict:
        """What the focus did, for the history: how many adversaries were replays, and the strongest at the end."""
        return {"replays": self.replays, "strongest": [
            {**{k: v for k, v in dataclasses.asdict(task).items() if k not in ("seed", "lora_rank")},
             "strength": strength} for task, strength in self.strongest()]}


def step_weights(points: int, scheme: str = "uniform", late_weight: float = 1.0) -> list[float]:
    """Weights of the suppression loss at the simulation's evaluation points, summing to 1. `exponential`:
    geometric growth from the first point to the last, which weighs `late_weight` times the first (the
    tamper-resistance training of Tamirisa et al. weighs later steps up so the trap holds far down the path)."""
    if scheme not in STEP_WEIGHTINGS:
        raise ConfigError(f"inner-step weighting {scheme!r} is not one of {', '.join(STEP_WEIGHTINGS)}")
    if scheme == "uniform" or points == 1:
        raw = [1.0] * points
    else:
        raw = [math.exp(math.log(late_weight) * j / (points - 1)) for j in range(points)]
    total = sum(raw)
    return [w / total for w in raw]


def eval_points(steps: int, eval_every: int) -> list[int]:
    """Inner steps after which the suppression loss is taken: 0, every `eval_every`-th step, and the last."""
    return sorted(set(range(0, steps + 1, eval_every)) | {steps})


@dataclass
class SimulationResult:
    grads: dict[str, torch.Tensor]  # weighted first-order gradient of the suppression loss, by parameter name
    suppression_loss: float  # weighted mean over the evaluation points
    final_suppression_loss: float  # after the last inner step
    depth_loss: float = 0.0  # weighted mean over the evaluation points of the depth term's MMD (before its weight)


def simulated_start(model: torch.nn.Module, strategy: str, seed: int, shrink: float = 1.0,
                    perturb: float = 0.0) -> tuple[dict[str, torch.Tensor], set[str], set[str], set[str]]:
    """(start values by parameter name, names re-initialised, names the strategy trains, names shrunk) for
    `strategy`, prepared by sophon.strategies on a copy, then shrunk and perturbed as the attack does it
    (`sophon.attacks.finetune`: the same seed), so the attack search and the simulation mean the same thing by a
    name. The start values are the re-initialised and the shrunk tensors'; the others start at the released ones."""
    from sophon.strategies import prepare, shrink_perturb, shrinkable

    strategy = START_ALIASES.get(strategy, strategy)
    if strategy == "lora":
        raise ConfigError("simulated_start: a lora adversary runs an adapted replica (lora_replica)")
    if strategy == "direct+all" and (shrink, perturb) == (1.0, 0.0):
        return {}, set(), {name for name, _ in model.named_parameters()}, set()
    replica = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):  # prepare() seeds torch's global generator; keep the caller's
        prepared = prepare(replica, strategy, seed=seed)
        shrunk = set(shrink_perturb(replica, shrinkable(prepared), shrink, perturb, seed=seed))
    values = dict(replica.named_parameters())
    trainable = {id(p) for p in prepared.trainable}
    start = {name: values[name].detach() for name in {*prepared.reinitialised, *shrunk}}
    return start, set(prepared.reinitialised), {name for name, p in values.items() if id(p) in trainable}, shrunk


def lora_replica(model: torch.nn.Module, seed: int, rank: int) -> tuple[torch.nn.Module, dict[str, str], set[str]]:
    """(a copy of `model` with peft's LoRA adapters, as the lora attack injects them; its base parameters' names →
    the model's names; the names of its adapter parameters, the only ones that train)."""
    from sophon.strategies import prepare

    replica = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        prepared = prepare(replica, "lora", seed=seed, lora_rank=rank)
    adapters = {id(p) for p in prepared.trainable}
    values = dict(replica.named_parameters())
    trained = {name for name, p in values.items() if id(p) in adapters}
    names = {name: name.replace(".base_layer.", ".") for name in values if name not in trained}
    if sorted(names.values()) != sorted(name for name, _ in model.named_parameters()):
        raise RuntimeError("lora_replica: the adapted replica's base parameters do not map onto the model's")
    return replica, names, trained


class Adversary:
    """One simulated adversary's fine-tune, run `run(steps)` at a time. A fresh one per outer loop is the paper's
    simulation; one kept for several loops (`persist_loops`) fine-tunes further down its path each loop, so the
    suppression is taken at weights many steps from the release. Its adapted weights follow the released ones:
    before each run they move by what the outer loop changed since (`follow`)."""

    def __init__(self, model: torch.nn.Module, objective: Objective, task: SimulatedTask, finetune_data: ImageSet,
                 eval_data: ImageSet, *, total_steps: int, eval_batch_size: int, generator: torch.Generator,
                 depth=None):
        self.model, self.objective, self.generator, self.task = model, objective, generator, task
        self.total_steps, self.created = total_steps, next(_created)
        self.depth = depth  # a sophon.protect.DepthTerm taken at the adapted weights, or None
        # `module` runs the fine-tune: the model, or for lora its adapted replica; `names` maps the module's
        # parameter names to the model's (the adapters have none).
        if START_ALIASES.get(task.start, task.start) == "lora":
            if depth is not None:
                raise ConfigError("sophon.task_space.starts: a lora adversary takes no depth term at adapted weights "
                                  "(its weights are the adapted replica's); use depth.at: released")
            self.module, self.names, self.trained = lora_replica(model, task.seed, task.lora_rank)
            fresh, self.reinitialised, shrunk = {}, set(), set()
        else:
            fresh, self.reinitialised, self.trained, shrunk = simulated_start(model, task.start, task.seed,
                                                                              task.shrink, task.perturb)
            self.module, self.names = model, {name: name for name, _ in model.named_parameters()}
        # d(adapted start)/d(released) per target: `shrink` for the shrunk tensors, 1 for the others.
        self.scale = {name: task.shrink for name in shrunk}
        released = dict(model.named_parameters())
        self.params = {name: fresh.get(name, released[self.names[name]].detach() if name in self.names else p.detach())
                       .clone().requires_grad_(name in self.trained) for name, p in self.module.named_parameters()}
        self.buffers = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        self.targets = [name for name in self.params if name in self.names and name not in self.reinitialised]
        self.anchor: dict[str, torch.Tensor] | None = None  # the released weights at the last run
        self.optimizer = make_optimizer(task.optimizer, [self.params[n] for n in self.params if n in self.trained],
                                        task.lr)
        self.scheduler = make_schedule(task.schedule, self.optimizer, total_steps)
        self.train_batches = endless_batches(finetune_data, task.batch_size, generator)
        self.eval_batches = endless_batches(eval_data, eval_batch_size, generator)

    def forward(self, *args):
        return functional_call(self.module, (self.params, self.buffers), args)

    @torch.no_grad()
    def follow(self) -> None:
        """Move the adapted weights by the released weights' change since the last run (re-initialised ones keep
        theirs: the adversary replaced them). The first run starts from the released weights: nothing to move."""
        model = dict(self.model.named_parameters())
        released = {name: model[self.names[name]].detach() for name in self.targets}
        if self.anchor is None:
            self.anchor = {name: p.clone() for name, p in released.items()}
            return
        for name, p in released.items():
            change = p - self.anchor[name]
            self.params[name] += change * self.scale[name] if name in self.scale else change
            self.anchor[name].copy_(p)

    def draw(self, steps: int, eval_every: int) -> tuple[list, list]:
        """The (evaluation, training) batches of the next `run(steps)`, drawn in the order `run` draws them."""
        points = set(eval_points(steps, eval_every))
        evals, trains = [], []
        for step in range(steps + 1):
            if step in points:
                evals.append(next(self.eval_batches))
            if step < steps:
                trains.append(next(self.train_batches))
        return evals, trains

    def run(self, steps: int, eval_every: int, weighting: str = "uniform", late_weight: float = 1.0,
            drawn: tuple[list, list] | None = None) -> SimulationResult:
        """`steps` inner steps; the suppression loss is evaluated on held-out restricted data at `eval_points`,
        each with the adapted weights, and the gradients are combined with `step_weights`. `drawn`: batches from
        `draw` to use instead of drawing them now."""
        self.follow()
        evals, trains = (iter(drawn[0]), iter(drawn[1])) if drawn is not None else (self.eval_batches,
                                                                                    self.train_batches)
        params, targets = self.params, self.targets
        points = eval_points(steps, eval_every)
        weights = dict(zip(points, step_weights(len(points), weighting, late_weight)))
        grads = {name: torch.zeros_like(params[name]) for name in targets}
        weighted, last, depth = 0.0, 0.0, 0.0
        self.model.train()
        for step in range(steps + 1):
            if step in weights:
                images, labels = next(evals)
                # Frozen tensors take part too: the gradient is first-order in every released weight.
                with_grad = [params[n].requires_grad_(True) for n in targets]
                loss = self.objective.suppression_loss(self.forward, images, labels, self.generator)
                total = loss
                if self.depth is not None:
                    mmd = self.depth(images, {**params, **{n: b.clone() for n, b in self.buffers.items()}}, labels)
                    total = loss + self.depth.weight * mmd
                    depth += weights[step] * mmd.item()
                for name, grad in zip(targets, torch.autograd.grad(total, with_grad)):
                    grads[name] += weights[step] * grad
                for name in targets:
                    params[name].requires_grad_(name in self.trained)
                last = loss.item()
                weighted += weights[step] * last
            if step == steps:
                break
            images, labels = next(trains)
            loss = self.objective.finetune_loss(self.forward, images, labels, self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        for name, factor in self.scale.items():  # the chain rule through a shrunk start
            grads[name] *= factor
        return SimulationResult({self.names[name]: grad for name, grad in grads.items()}, weighted, last, depth)


def batch_key(adversary: Adversary) -> tuple | None:
    """What adversaries must share to run as one `AdversaryBatch`, or None where this one cannot (a depth term, an
    objective whose losses draw random numbers, an optimiser that is not elementwise)."""
    task = adversary.task
    if (adversary.depth is not None or getattr(adversary.objective, "losses_draw", True)
            or task.optimizer not in ELEMENTWISE or adversary.module is not adversary.model or adversary.scale):
        return None
    return (frozenset(adversary.trained), task.optimizer, task.lr, task.batch_size, task.schedule,
            adversary.total_steps)


class AdversaryBatch:
    """K adversaries of one `batch_key` run as one: their weights, buffers and optimiser state stacked along a first
    dimension of size K, their forward passes one pass of the K-fold network (sophon.fold; or one `torch.func.vmap`,
    `engine="vmap"`, any network). Built from fresh adversaries (before their first run); from then on it holds their
    state (`params[name][k]` is adversary k's). `run` gives each its own `SimulationResult`,
    equal to what `Adversary.run` gives it to float rounding."""

    def __init__(self, adversaries: list[Adversary], engine: str = "fold"):
        if engine not in ("fold", "vmap"):
            raise ValueError(f"engine {engine!r} is not fold or vmap")
        keys = {batch_key(a) for a in adversaries}
        if None in keys or len(keys) != 1:
            raise ValueError("an AdversaryBatch needs adversaries of one batch key")
        if any(a.anchor is not None for a in adversaries):
            raise ValueError("an AdversaryBatch is built from adversaries that have not run yet")
        first = adversaries[0]
        self.adversaries, self.model, self.objective = adversaries, first.model, first.objective
        self.trained, self.engine = first.trained, engine
        self.folded = fold_model(first.model, len(adversaries)) if engine == "fold" else None
        self.plan = fold_plan(first.model) if engine == "fold" else None
        self.checked = False  # the folded forward is checked against the network's own at its first call
        names = list(first.params)
        self.params = {n: torch.stack([a.params[n].detach() for a in adversaries]).requires_grad_(n in self.trained)
                       for n in names}
        self.buffers = {n: torch.stack([a.buffers[n] for a in adversaries]) for n in first.buffers}
        for a in adversaries:  # the batch holds their state now
            a.params, a.buffers = {}, {}
        self.targets = [n for n in names if any(n in a.targets for a in adversaries)]
        self.anchor: dict[str, torch.Tensor] | None = None
        task = first.task
        self.optimizer = make_optimizer(task.optimizer, [self.params[n] for n in names if n in self.trained], task.lr)
        self.scheduler = make_schedule(task.schedule, self.optimizer, first.total_steps)

    def _losses(self, loss_fn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[K] losses of the K adversaries, adversary k on images[k], labels[k]."""
        model, generator = self.model, self.adversaries[0].generator
        if self.engine == "vmap":
            def one(params, buffers, x, y):
                return loss_fn(lambda *args: functional_call(model, (params, buffers), args), x, y, generator)

            return vmap(one)(self.params, self.buffers, images, labels)
        # The fold: copy k's input channels at [k·C, (k+1)·C); each loss gets its copy's logits (the objective's
        # loss calls its forward once, on the batch's model input).
        count = len(self.adversaries)
        inputs = [self.objective.model_inputs(images[k], generator) for k in range(count)]
        if any(len(i) != 1 for i in inputs):
            raise ValueError("the fold takes networks of one input")
        x = torch.cat([i[0] for i in inputs], dim=1)
        logits = functional_call(self.folded, fold_tensors({**self.params, **self.buffers}, self.plan), (x,))
        for b in self.buffers.values():
            if b.dim() == 1:  # a batch count: the folded network counted in copy 0's
                b[1:] = b[0]
        logits = logits.view(len(x), count, -1)
        if not self.checked:
            self._check(inputs[0], logits[:, 0])
        return torch.stack([loss_fn(lambda *_, k=k: logits[:, k], images[k], labels[k], generator)
                            for k in range(count)])

    @torch.no_grad()
    def _check(self, inputs: tuple, folded: torch.Tensor) -> None:
        """Copy 0's folded output against the network's own at its weights (copies of its buffers): a forward pass
        whose own code mixes channels would make the fold wrong."""
        own = functional_call(self.model, ({n: p[0] for n, p in self.params.items()},
                                           {n: b[0].clone() for n, b in self.buffers.items()}), inputs)
        if not torch.allclose(own, folded.detach(), rtol=1e-3, atol=1e-4 * (1 + own.abs().max().item())):
            raise RuntimeError(f"the K-fold of {type(self.model).__name__} does not compute what it computes (its "
                               f"forward mixes channels?): set sophon.batched: false")
        self.checked = True

    @torch.no_grad()
    def follow(self) -> None:
        """`Adversary.follow` for every slice: each adversary's own targets move by the released weights' change."""
        released = {n: p.detach() for n, p in self.model.named_parameters() if n in self.targets}
        if self.anchor is None:
            self.anchor = {n: p.clone() for n, p in released.items()}
            return
        for n, p in released.items():
            change = p - self.anchor[n]
            for k, adversary in enumerate(self.adversaries):
                if n in adversary.targets:
                    self.params[n][k] += change
            self.anchor[n].copy_(p)

    def run(self, steps: int, eval_every: int, weighting: str = "uniform", late_weight: float = 1.0,
            drawn: list[tuple[list, list]] | None = None) -> list[SimulationResult]:
        """`Adversary.run` for the K adversaries at once; `drawn`: each adversary's batches from `Adversary.draw`."""
        if drawn is None:
            drawn = [a.draw(steps, eval_every) for a in self.adversaries]
        self.follow()
        params, count = self.params, len(self.adversaries)
        points = eval_points(steps, eval_every)
        weights = step_weights(len(points), weighting, late_weight)
        grads = [{n: torch.zeros_like(params[n][0]) for n in a.targets} for a in self.adversaries]
        weighted, last = [0.0] * count, [0.0] * count
        stack = lambda batches, i: (torch.stack([b[i][0] for b in batches]), torch.stack([b[i][1] for b in batches]))
        self.model.train()
        for step in range(steps + 1):
            if step in points:
                j = points.index(step)
                images, labels = stack([d[0] for d in drawn], j)
                with_grad = [params[n].requires_grad_(True) for n in self.targets]
                losses = self._losses(self.objective.suppression_loss, images, labels)
                for n, grad in zip(self.targets, torch.autograd.grad(losses.sum(), with_grad)):
                    for k, adversary in enumerate(self.adversaries):
                        if n in adversary.targets:
                            grads[k][n] += weights[j] * grad[k]
                for n in self.targets:
                    params[n].requires_grad_(n in self.trained)
                for k, value in enumerate(losses.detach().tolist()):
                    last[k] = value
                    weighted[k] += weights[j] * value
            if step == steps:
                break
            images, labels = stack([d[1] for d in drawn], step)
            loss = self._losses(self.objective.finetune_loss, images, labels).sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        return [SimulationResult(g, w, v, 0.0) for g, w, v in zip(grads, weighted, last)]


def group_adversaries(adversaries: list[Adversary], batched: bool = True) -> list[Adversary | AdversaryBatch]:
    """The runners of `adversaries`: with `batched`, an `AdversaryBatch` (the fold) for every two or more of one
    `batch_key` (in the order of their first member), the rest one at a time; all one at a time where the network is
    not foldable (the vmap engine would be slower than that)."""
    if not batched or not adversaries or not foldable(adversaries[0].model):
        return list(adversaries)
    groups: dict = {}
    for index, adversary in enumerate(adversaries):
        key = batch_key(adversary)
        groups.setdefault(("alone", index) if key is None else key, []).append(adversary)
    return [AdversaryBatch(group) if len(group) > 1 else group[0] for group in groups.values()]


def run_adversaries(runners: list[Adversary | AdversaryBatch], steps: int, eval_every: int,
                    weighting: str = "uniform", late_weight: float = 1.0) -> list[SimulationResult]:
    """Every runner's `run`; the results in the adversaries' order (of `group_adversaries`' input). With a batch among
    them every adversary's batches are drawn first, in that order, as the one-at-a-time runs would draw them (their
    objective draws nothing else from the generator)."""
    members = [r.adversaries if isinstance(r, AdversaryBatch) else [r] for r in runners]
    if not any(isinstance(r, AdversaryBatch) for r in runners):
        return [r.run(steps, eval_every, weighting, late_weight) for r in runners]
    order = sorted((a for group in members for a in group), key=lambda a: a.created)
    drawn = {id(a): a.draw(steps, eval_every) for a in order}
    results = {}
    for runner, group in zip(runners, members):
        if isinstance(runner, AdversaryBatch):
            out = runner.run(steps, eval_every, weighting, late_weight, [drawn[id(a)] for a in group])
        else:
            out = [runner.run(steps, eval_every, weighting, late_weight, drawn[id(runner)])]
        results.update({id(a): r for a, r in zip(group, out)})
    return [results[id(a)] for a in order]


def simulate_finetune(model: torch.nn.Module, objective: Objective, task: SimulatedTask, finetune_data: ImageSet,
                      eval_data: ImageSet, *, steps: int, eval_every: int, eval_batch_size: int,
                      generator: torch.Generator, weighting: str = "uniform", late_weight: float = 1.0,
                      ) -> SimulationResult:
    """One fresh adversary's K = `steps` inner steps (the paper's simulation): see `Adversary.run`."""
    adversary = Adversary(model, objective, task, finetune_data, eval_data, total_steps=steps,
                          eval_batch_size=eval_batch_size, generator=generator)
    return adversary.run(steps, eval_every, weighting, late_weight)
