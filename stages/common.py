"""What every stage entry point shares: arguments, config, threads, device, logging and error handling."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from sophon.config import load_params
from sophon.errors import SophonError
from sophon.train import resolve_device


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="the pipeline config (default: params.yaml)")
    return p


def setup(args) -> tuple[dict, torch.device]:
    """Validate the config, pin torch threads to the orchestrator's share, pick the device."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    config = load_params(args.params)
    # Snakemake sets OMP_NUM_THREADS to the rule's `threads:`; DVC runs one stage at a time with config.threads.
    threads = int(os.environ.get("OMP_NUM_THREADS") or config["threads"])
    torch.set_num_threads(max(1, threads))
    return config, resolve_device(config["device"])


def run(main) -> None:
    """Call `main()`; a SophonError ends the process with one line on stderr and exit status 2."""
    try:
        main()
    except SophonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
