"""What every stage entry point shares: arguments, config, threads, device, logging and error handling."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import torch

from sophon.config import experiment, load_params
from sophon.errors import SophonError
from sophon.train import resolve_device


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="the pipeline config (default: params.yaml)")
    p.add_argument("--experiment", help="an experiment of the config (default: its only one)")
    return p


def setup(args) -> tuple[dict, torch.device]:
    """Validate the config, pick the experiment, pin torch threads to the orchestrator's share, pick the device.
    Returns the experiment (its section of params.yaml, its name under `name`) and the device."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    config = load_params(args.params)
    chosen = experiment(config, args.experiment, args.params)
    # Snakemake sets OMP_NUM_THREADS to the rule's `threads:`; DVC runs one stage at a time with config.threads.
    threads = int(os.environ.get("OMP_NUM_THREADS") or config["threads"])
    torch.set_num_threads(max(1, threads))
    return chosen, resolve_device(config["device"])


def split_digests(exp: dict) -> dict[str, str]:
    """Part name → SHA-256 of the experiment's split, from its manifest."""
    from sophon import layout
    from sophon.io import read_json

    return {part: entry["sha256"] for part, entry in read_json(layout.split_manifest(exp["name"]))["parts"].items()}


def parts(exp: dict, *names: str):
    """Split parts of the experiment, each checked against the split manifest; each becomes an input (an MLflow
    dataset with its digest) of the stage's run."""
    from sophon import layout
    from sophon.data.splits import load_part
    from sophon.tracking import note_input

    manifest = layout.split_manifest(exp["name"])
    digests = split_digests(exp)
    loaded = []
    for name in names:
        path = layout.split_part(exp["name"], name)
        loaded.append(load_part(path, manifest))
        note_input(name, path, digests[name], len(loaded[-1]))
    return loaded


def start_builder(exp: dict, start: str, device):
    """A function returning a fresh copy of a start's model (from scratch: a new one, seeded by the caller). A saved
    model is loaded, and its weights checked against its card, once: before any run, cached or not."""
    import copy

    from sophon.tasks import load_model, task_of

    if start == "scratch":
        return lambda: task_of(exp).build(exp).to(device)
    model = load_model(exp, start, device)[0]
    return lambda: copy.deepcopy(model)


def fine_tuning_setup(exp: dict, start: str, device):
    """What every fine-tuning stage (attack, search, red team) reads for one start: the objective, the adversary's
    half and the restricted test set, a builder of fresh copies of the start's model, and its run cache."""
    from sophon.tasks import task_of

    adversary, test = parts(exp, "adversary", "restricted_test")
    objective = task_of(exp).objective(exp, device)
    return objective, adversary, test, start_builder(exp, start, device), run_cache(exp, start, objective)


def run_cache(exp: dict, start: str, objective):
    """The cache of finished fine-tuning runs from one start (sophon.search.RunCache), keyed by the start model's
    weights (its architecture from scratch), the objective and its settings, and the data the runs read."""
    from sophon import layout
    from sophon.io import read_json
    from sophon.search import RunCache

    name = exp["name"]
    if start == "scratch":
        model = exp.get("model") or exp.get("unet")
    else:
        model = {"weights": read_json(layout.model_dir(name, start) / layout.CARD)["weights_sha256"]}
    digests = split_digests(exp)
    # The objective's settings change every curve (diffusion: the metric's noise repeats, the augmentation).
    objective_key = {"class": type(objective).__name__, **{k: exp[k] for k in ("eval", "augment") if k in exp}}
    return RunCache(layout.run_cache(name), {
        "start": start, "model": model, "objective": objective_key,
        "data": {part: digests[part] for part in ("adversary", "restricted_test")}})


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(main) -> None:
    """Call `main()`; a SophonError ends the process with one line on stderr and exit status 2. SIGTERM (what
    Snakemake and schedulers send to stop a job) is handled like Ctrl-C: the MLflow run ends KILLED, no output
    is half-written (atomic writes), and the process exits with status 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except SophonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"interrupted{f' by {exc}' if str(exc) else ''}", file=sys.stderr)
        sys.exit(130)
