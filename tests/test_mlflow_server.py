"""Shared MLflow: a real `mlflow server` on localhost; a stage logs to it through MLFLOW_TRACKING_URI, with its
inputs and artifacts going through the server."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.pipeline_helpers import copy_project, environment, tiny_params

CLS = "quick-classification"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    process = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                                "--artifacts-destination", str(tmp_path / "server-artifacts")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)
    yield url, tmp_path
    process.terminate()
    process.wait(timeout=30)


def test_stages_log_to_a_shared_server(server):
    url, tmp_path = server
    (tmp_path / "project").mkdir()
    root = copy_project(tmp_path / "project")
    tiny_params(root / "params.yaml")
    env = {**environment(root), "MLFLOW_TRACKING_URI": url}
    for stage in ("split", "pretrain"):
        done = subprocess.run(["python", "-m", f"stages.{stage}", "--experiment", CLS], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert not (root / "mlflow.db").exists()  # nothing went to a local store

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name(CLS)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.data.tags["sophon.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"split", "pretrain"} and all(r.info.status == "FINISHED" for r in runs.values())
    pretrain = runs["pretrain"]
    assert {i.dataset.name for i in pretrain.inputs.dataset_inputs} >= {f"{CLS}/original_train", f"{CLS}/original_val"}
    artifacts = [a.path for a in client.list_artifacts(pretrain.info.run_id)]
    assert artifacts, "the pretrain run's artifacts did not reach the server"
    assert any((tmp_path / "server-artifacts").rglob("*")), "artifacts are not in the server's destination"
