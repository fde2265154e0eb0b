"""The protect stage resumes: killed with SIGKILL after a saved state and rerun, it ends with the same weights as an
uninterrupted run (CPU, same thread count), and the state survives the removal of its outputs."""

import json
import signal
import subprocess
import time

import torch
import yaml
from safetensors.torch import load_file

from tests.pipeline_helpers import copy_project, environment, run, tiny_params

CLS = "quick-classification"


def _protect(root):
    return ["python", "-m", "stages.protect", "--experiment", CLS]


def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    root = copy_project(tmp_path)
    params = tiny_params(root / "params.yaml")
    # No rollback, whatever this machine's numerics: its path (forced) is tested in test_sophon_core.py.
    params["experiments"][CLS]["sophon"].update(loops=30, inner_steps=8, check_every=4, save_every=5,
                                                rollback_tolerance=1000.0)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("split", "pretrain"):
        run(["python", "-m", f"stages.{stage}", "--experiment", CLS], root)
    weights = root / "models" / CLS / "sophon" / "model.safetensors"
    state = root / ".cache" / "protect" / CLS / "state.json"

    run(_protect(root), root)
    uninterrupted = load_file(str(weights))
    assert not state.parent.exists()  # a finished run leaves no state behind
    weights.unlink()  # as DVC removes the outputs before it reruns a stage

    child = subprocess.Popen(_protect(root), cwd=root, env=environment(root), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not weights.exists() and state.exists()
    saved_after = json.loads(state.read_text())["tree"]["dict"]
    loop = dict(saved_after)["loop"]["value"]
    assert 5 <= loop < 30

    resumed = run(_protect(root), root)
    assert f"resumed from the state saved after loop {loop}" in resumed.stderr
    final = load_file(str(weights))
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final), "resumed weights differ"
    history = json.loads((root / "results" / CLS / "training" / "sophon.json").read_text())
    assert history["loop"] == list(range(1, 31))
    assert not state.parent.exists()
