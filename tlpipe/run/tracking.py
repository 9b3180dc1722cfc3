"""MLflow: one run per fit, holding params, metrics and artifacts, in a store the user can name.

The store is MLflow's own default (``sqlite:///mlflow.db`` in the working folder for MLflow >= 3.7)
unless ``MLFLOW_TRACKING_URI`` or an explicit URI says otherwise; ``tlpipe ui`` serves that same
store (``tlpipe.run.store`` checks it first; ``tlpipe.run.servers`` runs the UI). Experiments that tlpipe creates in a SQLite store keep their artifacts in ``mlartifacts/``
beside the database file, so a store is one self-contained folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import tempfile
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

from tlpipe.utils import process_alive


from tlpipe.run.store import resolve_tracking_uri, sqlite_file

UI_VIEW = "tlpipe"  # the runs view ``tlpipe ui`` opens (MLflow's ``?viewStateShareKey=``)
_VIEW_COLUMNS = [*(f"metrics.`{split}_{score}`" for split in ("test", "val") for score in ("accuracy", "map")),
                 "params.`strategy`", "params.`backbone`", "attributes.`Duration`"]
UI_TAGS = {  # on each experiment a fit logs to: MLflow's UI opens it as model training, not GenAI,
    "mlflow.experimentKind": "custom_model_development",  # the experiment's kind, as the UI reads it
    f"mlflow.sharedViewState.{UI_VIEW}": json.dumps(  # a view in the UI's "share" format: the columns runs are compared by
        {"selectedColumns": _VIEW_COLUMNS, "orderByKey": "attributes.start_time", "orderByAsc": False}),
}


def _artifact_root(uri: str) -> str | None:
    db = sqlite_file(uri)
    return (db.parent / "mlartifacts").as_uri() if db else None


def _write_ahead_log(db: Path) -> None:
    """Put a SQLite store in WAL mode (it stays so): each of the many small writes of a tuning
    study's nested runs then costs about half, and readers (``tlpipe ui``) never block a fit."""
    import sqlite3

    with closing(sqlite3.connect(db, timeout=30)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


_MLFLOW_KEY = re.compile(r"[\w.\- /]{1,250}")  # MLflow's rule for metric, param and tag keys (no colon: Windows)
KEY_MAP = "mlflow_keys.json"  # the run artifact that maps each renamed key back to the real name


def mlflow_key(name: str) -> str:
    """``name`` as an MLflow key: itself when MLflow accepts it, else with each refused character as
    ``_`` and 8 hex digits of the real name's hash (two names never share a key). Class names are
    data: ``val_f1_bees (apis)`` becomes ``val_f1_bees _apis_-4c1f2a9b``."""
    if _MLFLOW_KEY.fullmatch(name) and posixpath.normpath(name) == name and not name.startswith(("/", "..")):
        return name
    clean = re.sub(r"[^\w.\- ]", "_", name)[:200]
    return f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _owner_tags() -> dict[str, str]:
    """Which process writes a run: what tells a live run from one whose fit was killed."""
    return {"tlpipe_host": socket.gethostname(), "tlpipe_pid": str(os.getpid())}


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Creating or migrating a SQLite store, one process at a time (a lock file beside the database):
    fits started together on a new store would otherwise race MLflow's migrations and leave the
    store half-migrated for every later fit."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{db}.lock"):
        yield


class FitRun:
    """A context manager around one MLflow run; ends FINISHED, or FAILED if the fit raised."""

    def __init__(self, experiment: str, tracking_uri: str | None = None, run_name: str | None = None,
                 resume_id: str | None = None):
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_id: str | None = None
        self.resume_id = resume_id  # an earlier run of the same fit to continue on entering, when it is whole
        self.continued = False  # True once entered on resume_id
        self.renamed: dict[str, str] = {}  # MLflow key -> real name, for keys mlflow_key changed
        self.renamed_logged = 0

    def __enter__(self) -> "FitRun":
        if self.run_id is not None:  # made by child() or attach(): already started
            return self
        with store_lock(self.tracking_uri):
            self.experiment_id = self._experiment_id()
        self._end_orphans()
        if self.resume_id and self._continue(self.resume_id):
            return self
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=_owner_tags()).info.run_id
        return self

    def _end_orphans(self) -> None:
        """End KILLED the experiment's runs left RUNNING by a fit of this machine that is no longer
        alive (SIGKILL, power loss): a run's status must say whether anything still writes to it."""
        host = socket.gethostname()
        for run in self.client.search_runs([self.experiment_id], f"attributes.status = 'RUNNING' and tags.tlpipe_host = '{host}'"):
            if not process_alive(int(run.data.tags.get("tlpipe_pid", 0))):
                self.client.set_tag(run.info.run_id, "tlpipe_status", "killed: its process is gone")
                self.client.set_terminated(run.info.run_id, "KILLED")

    def _experiment_id(self) -> str:
        """The experiment's id, made (with the store's tables, on first use) when missing."""
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)  # also creates or migrates the store's tables
        if db := sqlite_file(self.tracking_uri):
            _write_ahead_log(db)
        if found is None:
            root = _artifact_root(self.tracking_uri)
            found = self.client.get_experiment(self.client.create_experiment(
                self.experiment, artifact_location=f"{root}/{self.experiment}" if root else None))
        for key, value in UI_TAGS.items():
            if found.tags.get(key) != value:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def _continue(self, run_id: str) -> bool:
        """Go on logging to ``run_id`` (an earlier, killed run of the same fit), RUNNING again; its
        trials' runs that a kill left RUNNING end KILLED. False when the run is gone from the store."""
        from mlflow.exceptions import MlflowException

        try:
            info = self.client.get_run(run_id).info
        except MlflowException:
            return False
        if info.experiment_id != self.experiment_id or info.lifecycle_stage != "active":
            return False
        ghosts = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'")
        for ghost in ghosts:
            self.client.set_terminated(ghost.info.run_id, "KILLED")
        self.client.update_run(run_id, status="RUNNING")
        for key, value in {**_owner_tags(), "tlpipe_status": "resumed"}.items():
            self.client.set_tag(run_id, key, value)
        self.run_id, self.continued = run_id, True
        return True

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
        """Params, metrics and tags in one call to the store. MLflow params never change: on a
        continued run, a param logged before with another value goes to the tags, which may."""
        from mlflow.entities import Metric, Param, RunTag

        params = {self._key(k): str(v)[:6000] for k, v in (params or {}).items()}
        tags = {self._key(k): str(v)[:5000] for k, v in (tags or {}).items()}
        if self.continued and params:
            logged = self.client.get_run(self.run_id).data.params
            tags.update({k: v for k, v in params.items() if logged.get(k, v) != v})
            params = {k: v for k, v in params.items() if logged.get(k, v) == v}
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()],
                              metrics=[Metric(self._key(k), float(v), now, step) for k, v in (metrics or {}).items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        self._log_key_map()

    def log_params(self, params: dict[str, Any]) -> None:
        self.log_batch(params=params)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.log_batch(metrics=metrics, step=step)

    def _key(self, name: str) -> str:
        """``mlflow_key(name)``, each renamed key kept with its real name for ``mlflow_keys.json``."""
        key = mlflow_key(name)
        if key != name:
            self.renamed[key] = name
        return key

    def _log_key_map(self) -> None:
        """The run's ``mlflow_keys.json`` (renamed key -> real name), logged again when it grew."""
        if len(self.renamed) == self.renamed_logged:
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / KEY_MAP
            path.write_text(json.dumps(self.renamed, ensure_ascii=False, indent=1), encoding="utf-8")
            self.client.log_artifact(self.run_id, str(path))
        self.renamed_logged = len(self.renamed)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files; hidden ones (a killed write's temporary files) never go."""
        path = Path(path)
        if not path.is_dir():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = file.relative_to(path)
            if not any(part.startswith(".") for part in relative.parts):
                folder = "/".join(part for part in (artifact_path, *relative.parent.parts) if part)
                self.client.log_artifact(self.run_id, str(file), folder or None)

    def delete_tags(self, *keys: str) -> None:
        """Remove ``keys`` from the run's tags where present (a cut's, once the fit completes)."""
        tags = self.client.get_run(self.run_id).data.tags
        for key in (self._key(k) for k in keys):
            if key in tags:
                self.client.delete_tag(self.run_id, key)


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

    def delete_tags(self, *keys: str) -> None:
        pass
