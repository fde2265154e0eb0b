"""Throughput benchmarks of the core's hot loops (not tests): median and spread over repeats.

    python benchmarks/run.py [--repeats 5] [--threads 2] [--only adversaries]

Measures, at the quick profile's sizes: a training step of the classifier (the attack and pretrain loop),
one Sophon outer loop (fine-tuning simulation + suppression + reinforcement), the fine-tuning simulation's
throughput against plain training of the same model at the same batch (images/s of the adversary's steps;
the protect stage's cost is this simulation; also its inner steps alone, without the suppression passes),
and one diffusion UNet training step. Writes
benchmarks/results.json and prints a table.

`--only adversaries` runs only the batched-adversary section (writes benchmarks/results_adversaries.json): K = 1, 2,
4, 8 simulated adversaries of one batch key (direct+all, Adam 1e-3) at the quick profile's inner batch sizes (32,
64), 10 inner steps evaluated every 4 (the quick profile's; eval batch 64), run as one `AdversaryBatch` (the K-fold
network; at K = 4 also its torch.func.vmap engine) against one at a time on the same batches: simulated
adversary-steps per second (K × 10 / seconds, the suppression passes included), the paths alternating within each
repeat (which goes first alternates too), the ratio per repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sophon.data import DomainRequest, load_domain  # noqa: E402
from sophon.models import build_classifier  # noqa: E402
from sophon.objectives import ClassificationObjective  # noqa: E402
from sophon.optim import make_optimizer  # noqa: E402
from sophon.protect import ProtectSettings, protect  # noqa: E402
from sophon.simulate import Adversary, AdversaryBatch, SimulatedTask, simulate_finetune  # noqa: E402
from sophon.train import endless_batches, to_input  # noqa: E402


def once(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        out.append(time.perf_counter() - began)
    return out


def batched_adversaries(digits, repeats: int, ks=(1, 2, 4, 8), batch_sizes=(32, 64), steps: int = 10,
                        eval_every: int = 4, vmap_ks=(4,)) -> dict:
    """Adversary-steps per second, batched against one at a time (module docstring); {"K=.. batch=..": {...}}."""
    model = build_classifier("test_resnet", 10)
    objective = ClassificationObjective("ice")
    half_a, half_b = digits.subset(range(500)), digits.subset(range(500, 1000))

    def timed_run(k: int, batch: int, mode: str) -> float:
        generator = torch.Generator().manual_seed(0)
        adversaries = [Adversary(model, objective, SimulatedTask("direct", "adam", 1e-3, batch, seed=i), half_a,
                                 half_b, total_steps=steps, eval_batch_size=64, generator=generator)
                       for i in range(k)]
        drawn = [a.draw(steps, eval_every) for a in adversaries]  # made and drawn outside the clock
        batched = AdversaryBatch(adversaries, engine=mode) if mode != "alone" else None
        began = time.perf_counter()
        if batched is not None:
            batched.run(steps, eval_every, drawn=drawn)
        else:
            for adversary, batches in zip(adversaries, drawn):
                adversary.run(steps, eval_every, drawn=batches)
        return time.perf_counter() - began

    out = {}
    for batch in batch_sizes:
        for k in ks:
            modes = ["fold", "alone"] + (["vmap"] if k in vmap_ks else [])
            for mode in modes:
                timed_run(k, batch, mode)  # warm-up
            runs = {mode: [] for mode in modes}
            for r in range(repeats):
                for mode in (modes if r % 2 == 0 else modes[::-1]):  # alternate, and which goes first
                    runs[mode].append(k * steps / timed_run(k, batch, mode))
            row = {"batched": runs["fold"], "one_at_a_time": runs["alone"],
                   "ratio": [b / a for b, a in zip(runs["fold"], runs["alone"])]}
            if "vmap" in runs:
                row.update(vmap=runs["vmap"], vmap_ratio=[b / a for b, a in zip(runs["vmap"], runs["alone"])])
            out[f"K={k} batch={batch}"] = row
            med = {name: statistics.median(v) for name, v in row.items()}
            print(f"K={k} batch={batch}: batched {med['batched']:.1f} steps/s, one at a time "
                  f"{med['one_at_a_time']:.1f}, ratio {med['ratio']:.2f}×"
                  + (f"; vmap {med['vmap']:.1f} ({med['vmap_ratio']:.2f}×)" if "vmap" in med else ""), flush=True)
    return out


def report_adversaries(results: dict, args) -> None:
    def stats(v):
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}

    summary = {name: {kind: stats(v) for kind, v in row.items()} for name, row in results.items()}
    summary.update(threads=args.threads, torch=torch.__version__)
    Path(__file__).with_name("results_adversaries.json").write_text(json.dumps(summary, indent=2) + "\n")
    def cell(v, unit=""):
        digits = 2 if unit else 1
        return f"{v['median']:.{digits}f}{unit} ({v['min']:.{digits}f}–{v['max']:.{digits}f}{unit})"

    print("| K, inner batch | batched (fold) steps/s | one at a time steps/s | fold / one at a time, per repeat "
          "| vmap / one at a time, per repeat |")
    print("|---|---|---|---|---|")
    for name, row in summary.items():
        if isinstance(row, dict):
            vmap = cell(row["vmap_ratio"], "×") if "vmap_ratio" in row else "–"
            print(f"| {name} | {cell(row['batched'])} | {cell(row['one_at_a_time'])} | {cell(row['ratio'], '×')} "
                  f"| {vmap} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["adversaries"], help="run only this section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only == "adversaries":
        digits = load_domain("mnist5k", DomainRequest(size=28)).subset(range(1000))
        report_adversaries(batched_adversaries(digits, args.repeats), args)
        return
    shapes = load_domain("shapes10", DomainRequest(size=28, options={"n": 2000}))
    digits = load_domain("mnist5k", DomainRequest(size=28)).subset(range(1000))
    model = build_classifier("test_resnet", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = to_input(shapes.images[:200], torch.device("cpu")), shapes.labels[:200]

    def train_step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    settings = ProtectSettings(loops=1, check_every=10**6)

    def sophon_loop():
        protect(model, ClassificationObjective("ice"), digits, shapes, shapes.subset(range(200)), settings,
                seed=0, device=torch.device("cpu"))

    # The simulation against plain training: `steps` adversary steps of batch 64 with Adam, evaluated (suppression
    # loss + its gradient) only before the first step and after the last, as the same steps on the module itself.
    # Both take their optimiser from sophon.optim, so the comparison is of the simulation, not of the optimiser.
    batch, objective = 64, ClassificationObjective("ice")
    sim_task = SimulatedTask(start="direct", optimizer="adam", lr=1e-3, batch_size=batch)
    half_a, half_b = digits.subset(range(500)), digits.subset(range(500, 1000))

    def simulation(steps: int):
        simulate_finetune(model, objective, sim_task, half_a, half_b, steps=steps, eval_every=steps,
                          eval_batch_size=batch, generator=torch.Generator().manual_seed(0))

    plain_opt = make_optimizer("adam", model.parameters(), 1e-3)

    def plain_training(steps: int):
        stream = endless_batches(half_a, batch, torch.Generator().manual_seed(0))
        for _ in range(steps):
            images, labels = next(stream)
            loss = objective.finetune_loss(model, images, labels, None)
            plain_opt.zero_grad()
            loss.backward()
            plain_opt.step()

    # Simulation and plain training alternate, so a slower or faster spell of the machine hits both alike; the
    # ratio is taken per pair. Each pair also runs twice the steps: the difference is the cost of `steps` inner
    # steps alone, without the two suppression passes, which are the method's own work.
    steps = 20
    simulation(steps), plain_training(steps)  # warm-up
    pairs = []
    for _ in range(args.repeats * 2):
        sim, plain = once(lambda: simulation(steps)), once(lambda: plain_training(steps))
        sim_long, plain_long = once(lambda: simulation(2 * steps)), once(lambda: plain_training(2 * steps))
        pairs.append((sim, plain, sim_long - sim, plain_long - plain))
    images = steps * batch
    results = {"train_step_batch200_images_per_s": [200 / t for t in timed(train_step, args.repeats * 4)],
               "sophon_outer_loop_s": timed(sophon_loop, args.repeats),
               "simulation_images_per_s": [images / p[0] for p in pairs],
               "plain_training_images_per_s": [images / p[1] for p in pairs],
               "simulation_over_plain_training": [p[1] / p[0] for p in pairs],
               "simulation_extra_steps_s": [p[2] for p in pairs], "plain_extra_steps_s": [p[3] for p in pairs]}
    try:
        from diffusers import UNet2DModel

        unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                           norm_num_groups=8)
        unet_opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
        images, t = torch.randn(64, 1, 16, 16), torch.randint(0, 1000, (64,))

        def unet_step():
            loss = (unet(images, t).sample - images).pow(2).mean()
            unet_opt.zero_grad()
            loss.backward()
            unet_opt.step()

        results["unet16_step_batch64_images_per_s"] = [64 / s for s in timed(unet_step, args.repeats * 2)]
    except ImportError:
        pass
    adversaries = batched_adversaries(digits, args.repeats)
    report_adversaries(adversaries, args)
    summary = {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for name, v in results.items()}
    # A difference of two timings is noisy per pair; the ratio of the medians is the stable figure.
    summary["inner_steps_only_simulation_over_plain"] = (summary["plain_extra_steps_s"]["median"]
                                                         / summary["simulation_extra_steps_s"]["median"])
    summary["threads"] = args.threads
    summary["torch"] = torch.__version__
    Path(__file__).with_name("results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, s in summary.items():
        if isinstance(s, dict):
            print(f"{name:40s} median {s['median']:9.2f}   range {s['min']:.2f}–{s['max']:.2f}   (n={s['n']})")
    ratio = summary["simulation_over_plain_training"]
    print(f"simulation / plain training, per alternating pair: median {ratio['median']:.2f}× "
          f"(range {ratio['min']:.2f}–{ratio['max']:.2f}×); {steps} more inner steps alone, ratio of the medians: "
          f"{summary['inner_steps_only_simulation_over_plain']:.2f}×")


if __name__ == "__main__":
    main()
