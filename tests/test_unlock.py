"""After Snakemake is killed with SIGKILL mid-job, `snakemake --unlock` then a rerun completes (the killed job's
outputs are recomputed: profiles/default sets rerun-incomplete)."""

import os
import signal
import subprocess
import time


from tests.pipeline_helpers import bin_path, copy_project, environment, run, tiny_params

CLS = "quick-classification"


def test_kill_9_unlock_rerun(tmp_path):
    root = copy_project(tmp_path)
    tiny_params(root / "params.yaml")
    target = f"models/{CLS}/original/model.json"
    snakemake = bin_path("snakemake")
    child = subprocess.Popen([snakemake, "--cores", "2", target], cwd=root, env=environment(root),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = root / "logs" / CLS / "pretrain.log"
    deadline = time.monotonic() + 300
    while not started.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)  # Snakemake and its running job, as a kill -9 of the session would
    child.wait()
    assert not (root / target).exists() and any((root / ".snakemake" / "locks").iterdir())

    locked = run([snakemake, "--cores", "2", target], root, check=False)
    assert locked.returncode != 0 and "--unlock" in locked.stdout + locked.stderr
    run([snakemake, "--unlock"], root)
    run([snakemake, "--cores", "2", target], root)
    assert (root / target).exists()
