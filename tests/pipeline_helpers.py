"""Shared by the end-to-end tests: a project copy in a temporary folder, a shrunk config, subprocess runners."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
COPIED = ["Snakefile", "dvc.yaml", "params.yaml", "workflow", "profiles", "sophon", "stages", "configs", ".dvc", ".dvcignore",
          ".gitignore", "environment.yml", "requirements.txt"]


def copy_project(dest: Path) -> Path:
    for name in COPIED:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        elif source.exists():
            shutil.copy2(source, dest / name)
    # DVC needs a git repository around its project.
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def tiny_params(path: Path) -> dict:
    """The quick profile shrunk to seconds: same experiments, stages and attack names, tiny sizes."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["threads"] = 1
    for exp in params["experiments"].values():
        exp["seeds"] = [0]
        exp["report"]["epochs"] = [0, 1, 2]
        for attack in exp["attacks"].values():
            attack["epochs"] = 2
        shrink_search(exp["search"])
        shrink_redteam(exp["redteam"])
        exp["ablation"]["variants"] = {"paper": exp["ablation"]["variants"]["paper"]}
        exp["pretrain"].update(epochs=1)
        if exp["task"] == "classification":
            exp["original"].update(options={"n": 200}, test_samples=100)
            exp["restricted"].update(train_samples=200, test_samples=100)
            exp["split"]["original_val_samples"] = 50
            exp["ntl"].update(steps=3)
            exp["sophon"].update(loops=3, inner_steps=2, check_every=2)
            exp["sweep"].update(lrs=[0.1], epochs=2)
        else:
            exp["original"].update(options={"n": 64}, train_samples=64, test_samples=16)
            exp["split"]["original_val_samples"] = 16
            exp["sophon"].update(loops=2, inner_steps=2, check_every=1)
            exp["ablation"]["variants"]["paper"].update(loops=2, inner_steps=2)  # it pins the paper's strength
            exp["stability"].update(seeds=[0], loops=2)
            exp["report"].update(images=2)
            exp["eval"]["repeats"] = 1
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def shrink_search(search: dict) -> None:
    """Two configurations per start, up to two epochs each; the best confirmed at one seed (three epochs by area, two
    as the best at epoch 1)."""
    search.update(trials=2, coarse_epochs=2, candidate_epochs=[1], confirm_top=1, epochs=3, seeds=[0])


def shrink_redteam(redteam: dict) -> None:
    """One red-team attack (the first) at one seed for two epochs."""
    first = next(iter(redteam["attacks"]), None)
    redteam["seeds"] = [0]
    redteam["attacks"] = {first: {**redteam["attacks"][first], "epochs": 2}} if first else {}


def environment(workdir: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(CI="true", SOPHON_PROGRESS="0", PYTHONPATH=str(workdir))
    return env


def run(args: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=environment(cwd), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def snakemake_dry_run(cwd: Path, *extra: str) -> list[dict]:
    """Jobs of `snakemake -n -p`: rule, input and output files, and the command without its log redirection."""
    out = run([bin_path("snakemake"), "-n", "-p", "--cores", "1", *extra], cwd).stdout
    jobs = []
    for block in re.split(r"\n\[[^\]]+\]\n", out):
        rule = re.search(r"^(?:local)?rule ([\w-]+):", block, re.M)
        if not rule:
            continue
        job = {"rule": rule.group(1), "input": [], "output": [], "cmd": None}
        for key in ("input", "output"):
            found = re.search(rf"^    {key}: (.*)$", block, re.M)
            if found:
                job[key] = [item.strip() for item in found.group(1).split(",")]
        cmd = re.search(r"^Shell command: (.*)$", block, re.M)
        if cmd and cmd.group(1).strip() != "None":
            job["cmd"] = cmd.group(1).split(" 2> ")[0].strip()
        jobs.append(job)
    return jobs
