"""MLflow: one run per fit, holding params, metrics and artifacts, in a store the user can name.

The store is MLflow's own default (``sqlite:///mlflow.db`` in the working folder for MLflow >= 3.7)
unless ``MLFLOW_TRACKING_URI`` or an explicit URI says otherwise; ``tlpipe ui`` serves that same
store. Experiments that tlpipe creates in a SQLite store keep their artifacts in ``mlartifacts/``
beside the database file, so a store is one self-contained folder.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tlpipe.errors import TlpipeError


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The explicit URI, else ``MLFLOW_TRACKING_URI``, else MLflow's default; relative SQLite
    paths are made absolute so the run records where its store really is."""
    if not uri:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    elif "://" not in uri:
        uri = Path(uri).resolve().as_uri()
    return uri


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


class FitRun:
    """A context manager around one MLflow run; ends FINISHED, or FAILED if the fit raised."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, run_name: str | None = None):
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_id: str | None = None

    def __enter__(self) -> "FitRun":
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            root = _artifact_root(self.tracking_uri)
            location = f"{root}/{self.experiment}" if root else None
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if exc_type is None else "FAILED")

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def ui_command(tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The MLflow UI server command line on the same store ``tlpipe fit`` writes to."""
    uri = resolve_tracking_uri(tracking_uri)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def serve_ui(tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI in the foreground until interrupted; return its exit code."""
    command = ui_command(tracking_uri, host, port)
    try:
        return subprocess.call(command, env=os.environ.copy())
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        raise TlpipeError(f"cannot start the MLflow UI ({exc}): is mlflow installed in this environment?") from None
