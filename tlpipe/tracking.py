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
from contextlib import closing
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


def _write_ahead_log(db: Path) -> None:
    """Put a SQLite store in WAL mode (it stays so): each of the many small writes of a tuning
    study's nested runs then costs about half, and readers (``tlpipe ui``) never block a fit."""
    import sqlite3

    with closing(sqlite3.connect(db, timeout=30)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


class FitRun:
    """A context manager around one MLflow run; ends FINISHED, or FAILED if the fit raised."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, run_name: str | None = None):
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_id: str | None = None

    def __enter__(self) -> "FitRun":
        from mlflow.tracking import MlflowClient

        if self.run_id is not None:  # made by child() or attach(): already started
            return self
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)  # also creates the store's tables
        if self.tracking_uri.startswith("sqlite:///"):
            _write_ahead_log(Path(self.tracking_uri.removeprefix("sqlite:///")))
        if found is None:
            root = _artifact_root(self.tracking_uri)
            location = f"{root}/{self.experiment}" if root else None
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        self.experiment_id = experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """FINISHED; FAILED on an error; KILLED when stopped from outside (Ctrl+C, SIGTERM: the
        BaseExceptions that are not errors)."""
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("FAILED" if issubclass(exc_type, Exception) else "KILLED")

    def end(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status)

    def child(self, run_name: str, tags: dict[str, str] | None = None) -> "FitRun":
        """A nested run under this one, started now in the same experiment and store: tagged
        ``mlflow.parentRunId`` as ``mlflow.start_run(nested=True)`` tags it, but with no active-run
        state, so any thread or process can make one. End it with ``end()`` or a ``with`` block."""
        run = FitRun(self.experiment, self.tracking_uri, run_name)
        run.client, run.experiment_id = self.client, self.experiment_id
        tags = {"mlflow.parentRunId": self.run_id, **(tags or {})}
        run.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        return run

    @classmethod
    def attach(cls, run_id: str, tracking_uri: str) -> "FitRun":
        """A handle on a run another process started (a tuning worker logs its trials under the
        lead's run); it is neither started nor ended here."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        info = client.get_run(run_id).info
        run = cls(client.get_experiment(info.experiment_id).name, tracking_uri, info.run_name)
        run.client, run.run_id, run.experiment_id = client, run_id, info.experiment_id
        return run

    def log_batch(self, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                  tags: dict[str, Any] | None = None, step: int = 0) -> None:
        """Params, metrics and tags in one call to the store."""
        import time

        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
                              metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                              tags=[RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()])

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


class NoRun(FitRun):
    """Stands in for ``FitRun`` on the ranks other than 0 of a torchrun fit: the same calls, and
    nothing logged, so the stages call a run without asking which rank they are on."""

    def __init__(self) -> None:
        self.experiment = self.run_name = self.tracking_uri = self.run_id = None

    def __enter__(self) -> "NoRun":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass

    def child(self, run_name: str, tags: dict[str, str] | None = None) -> "NoRun":
        return NoRun()

    def log_batch(self, params=None, metrics=None, tags=None, step: int = 0) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


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
