"""MLflow: one run per stage execution, grouped per pipeline invocation by a shared tag.

The store defaults to a SQLite file in the project folder (`sqlite:///mlflow.db`, artifacts under
`mlartifacts/`); MLFLOW_TRACKING_URI overrides it. Snakemake creates the store once before parallel
jobs start (concurrent first-time creation of one SQLite store races).

A run ends FINISHED, FAILED (the stage raised) or KILLED (SIGINT/SIGTERM, see stages.common.run). A job killed
with SIGKILL cannot end its own run: each run carries its host and process id, and the next stage or pipeline
start on that host marks RUNNING runs whose process is gone as KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
import warnings
from pathlib import Path

from filelock import FileLock

INVOCATION_ENV = "SOPHON_INVOCATION"
DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
# MLflow 3's UI opens an experiment by its kind: model training (runs, metrics), not GenAI (traces).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(project_dir: str | Path = ".") -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(project_dir).resolve() / DEFAULT_DB)}"


def invocation_id() -> str:
    """The group tag shared by the runs of one pipeline invocation (set by the Snakefile; one per process otherwise)."""
    if INVOCATION_ENV not in os.environ:
        os.environ[INVOCATION_ENV] = uuid.uuid4().hex[:12]
    return os.environ[INVOCATION_ENV]


def _quiet() -> None:
    for name in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)


def init_store(experiment: str, project_dir: str | Path = ".") -> str:
    """Create the store and the experiment if missing; return the experiment id."""
    import mlflow

    _quiet()
    # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI itself (for child processes).
    server = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(tracking_uri(project_dir))
    if server:
        return _experiment_id(experiment, None)
    # Two stages started by hand at once on a fresh project would both create the SQLite store's schema, and the
    # second's migration fails: one at a time (the Snakefile creates it before any job).
    root = Path(project_dir).resolve()
    with FileLock(str(root / (DEFAULT_DB + ".lock"))):
        return _experiment_id(experiment, (root / ARTIFACT_DIR).as_uri())


def _experiment_id(experiment: str, artifacts: str | None) -> str:
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # a store made before the tag was set
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        end_orphaned_runs(found.experiment_id)
        return found.experiment_id
    # The local store keeps artifacts beside the project (`artifacts`); a tracking server keeps them where it was
    # told to (`mlflow server --artifacts-destination`), so every node reaches them through it (None).
    try:
        return mlflow.create_experiment(experiment, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # created by a concurrent process in the meantime
        return mlflow.get_experiment_by_name(experiment).experiment_id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone; return their ids. Runs of other hosts
    are left alone (their process cannot be checked from here)."""
    from mlflow import MlflowClient

    client, host, ended = MlflowClient(), socket.gethostname(), []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        pid = tags.get("sophon.pid", "")
        if tags.get("sophon.host") == host and pid.isdigit() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    if ended:
        logging.getLogger("sophon.tracking").warning("marked %d run(s) of killed jobs KILLED", len(ended))
    return ended


# The split parts this process read (name, path, sha256, rows): stage_run logs them as the run's inputs.
_INPUTS: list[tuple[str, Path, str, int]] = []


def note_input(name: str, path: str | Path, sha256: str, rows: int) -> None:
    _INPUTS.append((name, Path(path), sha256, rows))


def _log_inputs(mlflow_module) -> None:
    """Each split part read as an MLflow dataset (metadata only: its file, digest and size), context = the part."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for name, path, sha256, rows in _INPUTS:
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path.resolve()))
        dataset = MetaDataset(source, name=f"{path.parent.name}/{name}", digest=sha256[:16])
        mlflow_module.log_input(dataset, context=name, tags={"rows": str(rows)})


class StageRun:
    """Thin wrapper so stages log without importing mlflow themselves."""

    def __init__(self, mlflow_module, run):
        self._mlflow = mlflow_module
        self.run = run

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self._mlflow.log_metric(key, float(value), step=step)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_artifacts(self, folder: str | Path, name: str | None = None) -> None:
        """Every file of `folder`, under the run's artifact folder `name`."""
        self._mlflow.log_artifacts(str(folder), artifact_path=name)

    def set_tag(self, key: str, value) -> None:
        self._mlflow.set_tag(key, str(value))

    def log_checkpoint(self, folder: str | Path, registered_name: str) -> str:
        """Log a checkpoint folder (safetensors + card) as an MLflow model of this run and register it as a new
        version of `registered_name` in the model registry; return the version. The model loads through
        sophon/mlflow_model.py (models-from-code, the sophon package shipped with it): no pickle."""
        from sophon.models import read_card

        sophon_dir = Path(__file__).resolve().parent
        card = read_card(folder)
        info = self._mlflow.pyfunc.log_model(
            name="model", python_model=str(sophon_dir / "mlflow_model.py"), artifacts={"checkpoint": str(folder)},
            code_paths=[str(sophon_dir)], pip_requirements=_requirements(),
            registered_model_name=registered_name, metadata={"card": card})
        version = info.registered_model_version
        client = self._mlflow.MlflowClient()
        for key in ("weights_sha256", "architecture", "stage", "suppression", "config_hash"):
            if key in card:
                client.set_model_version_tag(registered_name, str(version), key, str(card[key]))
        return str(version)

    def child(self, name: str, *, params: dict, metrics: dict, curve: tuple[str, list[float]] | None = None,
              steps: list[int] | None = None, tags: dict | None = None) -> None:
        """A finished nested run under this one (MLflow's convention for sweeps): params, metrics and a curve
        (at `steps`, by default 0, 1, 2, … as for per-epoch curves), written in one batch. Non-finite points
        are left out."""
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param, RunTag

        client = MlflowClient()
        run_tags = {"mlflow.parentRunId": self.run.info.run_id, "mlflow.runName": name,
                    "sophon.invocation": invocation_id(), **{k: str(v) for k, v in (tags or {}).items()}}
        child = client.create_run(self.run.info.experiment_id, run_name=name, tags=run_tags)
        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        if curve is not None:
            key, points = curve
            values += [Metric(key, float(v), now, step) for step, v in zip(steps or range(len(points)), points)
                       if v is not None and math.isfinite(v)]
        client.log_batch(child.info.run_id, metrics=values,
                         params=[Param(k, str(v)[:500]) for k, v in _flatten(params).items()])
        client.set_terminated(child.info.run_id, "FINISHED")


def _requirements() -> list[str]:
    """The pinned packages the logged model needs (from requirements.txt when present)."""
    path = Path(__file__).resolve().parent.parent / "requirements.txt"
    wanted = ("torch==", "torchvision==", "timm==", "diffusers==", "safetensors==", "numpy==", "mlflow==")
    if not path.exists():
        return ["torch", "timm", "diffusers", "safetensors", "numpy"]
    return [line.strip() for line in path.read_text().splitlines() if line.strip().startswith(wanted)]


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, *, params: dict, tags: dict | None = None, name: str | None = None):
    """Open one MLflow run for a stage execution; it ends FINISHED, FAILED if the stage raises, KILLED if it is
    interrupted (KeyboardInterrupt, which stages.common.run raises on SIGTERM too)."""
    import mlflow

    from sophon.models import compute_environment

    experiment_id = init_store(experiment)
    all_tags = {"sophon.stage": stage, "sophon.invocation": invocation_id(), "sophon.host": socket.gethostname(),
                "sophon.pid": str(os.getpid()),
                **{f"sophon.{k}": v for k, v in compute_environment().items()}, **(tags or {})}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=name or stage, tags=all_tags)
    try:
        mlflow.log_params(_flatten(params))
        _log_inputs(mlflow)
        yield StageRun(mlflow, run)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _flatten(params: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat
