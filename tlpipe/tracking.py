"""MLflow: one run per fit, holding params, metrics and artifacts, in a store the user can name.

The store is MLflow's own default (``sqlite:///mlflow.db`` in the working folder for MLflow >= 3.7)
unless ``MLFLOW_TRACKING_URI`` or an explicit URI says otherwise; ``tlpipe ui`` serves that same
store. Experiments that tlpipe creates in a SQLite store keep their artifacts in ``mlartifacts/``
beside the database file, so a store is one self-contained folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

from tlpipe.errors import TlpipeError
from tlpipe.utils import process_alive


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store URI (``sqlite:///path?options``); None for other stores."""
    return Path(uri.removeprefix("sqlite:///").partition("?")[0]) if uri.startswith("sqlite:///") else None


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


_STORE_SCHEMES = {"file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc"}
_DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
_OTHER_STORE = "give another --tracking-uri (or MLFLOW_TRACKING_URI)"


def check_store(uri: str | None = None, write: bool = True) -> str:
    """The resolved store URI, once a check of a few seconds at most found it usable: a malformed
    URI, a store that cannot be written (``write``: a fit's, the UI's) or a server that does not
    answer is one line before the data check and model loading, not MLflow's exception (or its
    retries, minutes long) after them."""
    raw = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    scheme = raw.partition(":")[0].lower() if re.match(r"[A-Za-z][\w+.-]+:", raw) else ""  # not C:\ (a drive)
    base, parts = scheme.split("+")[0], urllib.parse.urlsplit(raw)
    if scheme and _malformed(raw, base, parts):
        raise TlpipeError(f"the tracking URI {raw!r} is malformed: write sqlite:////abs/path/mlflow.db, "
                          f"sqlite:///relative.db or http://host:port; {_OTHER_STORE}")
    if scheme and base not in _STORE_SCHEMES and scheme not in _plugin_schemes():
        raise TlpipeError(f"the tracking URI {raw!r} has an unknown scheme {scheme!r}: use sqlite:///mlflow.db, "
                          f"http(s)://host:port or a database URL (postgresql://...); {_OTHER_STORE}")
    uri = resolve_tracking_uri(uri)  # as the run will: mlflow.set_tracking_uri, else the environment
    if uri.startswith(("sqlite:///", "file:")) and not write:
        return uri  # a local store is read as it is (tlpipe serve says when the model is not in it)
    if uri.startswith("sqlite:///"):
        _check_sqlite(sqlite_file(uri))
    elif uri.startswith("file:"):
        _check_file_store(Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path)))
    elif base in ("http", "https"):
        _check_server(parts)
    elif base in _DATABASE_PORTS and parts.hostname:  # no host: a local socket, MLflow's to try
        _check_database(parts.hostname, parts.port or _DATABASE_PORTS[base])
    return uri


def _malformed(raw: str, base: str, parts: urllib.parse.SplitResult) -> bool:
    """A URI MLflow would misread or refuse late: ``sqlite:/x.db``, ``sqlite://x.db``, no path, no host, a bad port."""
    try:
        parts.port  # noqa: B018 (raises on a port that is no number)
    except ValueError:
        return True
    return ("://" not in raw or base == "sqlite" and not re.match(r"sqlite(\+\w+)?:///[^?]", raw)
            or base == "file" and not parts.path or base in ("http", "https") and not parts.hostname)


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins add (``mlflow.tracking_store`` entry points)."""
    from importlib.metadata import entry_points

    return {point.name for point in entry_points(group="mlflow.tracking_store")}


def _check_sqlite(db: Path) -> None:
    """A SQLite store MLflow can write: a folder that is or can be made, and the database and the lock
    file beside it (``_store_lock``) writable files, the database a SQLite one."""
    _check_folder(db.parent, db)
    for path in (db, Path(f"{db}.lock")):
        if os.path.lexists(path) and not (path.is_file() and os.access(path, os.R_OK | os.W_OK)):
            kind = "a folder, not a file" if path.is_dir() else "not a writable file"
            raise TlpipeError(f"cannot write the MLflow store: {path} is {kind}; fix it or {_OTHER_STORE}")
    if not db.is_file():
        return  # MLflow makes it
    import sqlite3

    # Through SQLite, never open(): closing another descriptor of the file would drop the POSIX locks
    # that this process's open SQLite connections hold on it (and another process could then remove
    # the write-ahead log under them).
    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)) as connection:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        if "locked" in str(exc):
            return  # a writer holds it now: a store in use
        raise TlpipeError(f"the MLflow store {db} is not a readable SQLite database ({exc}): {_OTHER_STORE}") from None


def _check_file_store(folder: Path) -> None:
    """A folder store: writable, and one this MLflow still takes (recent ones refuse it unless told)."""
    from mlflow import environment_variables

    _check_folder(folder)
    allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    if allowed is not None and not allowed.get():
        raise TlpipeError(f"MLflow refuses a folder as its store ({folder}) unless MLFLOW_ALLOW_FILE_STORE=true: "
                          f"set it, or give a SQLite store (sqlite:///mlflow.db) with --tracking-uri or MLFLOW_TRACKING_URI")


def _check_folder(folder: Path, store: Path | None = None) -> None:
    """``folder`` (of the MLflow ``store``, else the store itself) is a writable folder, or can be made in one."""
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not existing.is_dir():
        raise TlpipeError(f"cannot make the MLflow store {store or folder}: {existing} is a file, not a folder; {_OTHER_STORE}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TlpipeError(f"cannot write the MLflow store {store or folder}: {existing} is read-only; "
                          f"make it writable or {_OTHER_STORE}")


def _check_server(parts: urllib.parse.SplitResult) -> None:
    """An MLflow server's ``/health`` answers within seconds (any HTTP status or TLS error: something
    listens, the rest is MLflow's to report); the URL's credentials stay out of the request and the line."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    address = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
    try:
        urllib.request.urlopen(f"{address}/health", timeout=5).close()
        return
    except urllib.error.URLError as exc:
        if isinstance(exc, urllib.error.HTTPError) or isinstance(exc.reason, ssl.SSLError):
            return  # an answer: MLflow reports what is wrong with it
        reason = exc.reason
    except (OSError, http.client.HTTPException) as exc:
        reason = exc
    raise TlpipeError(f"nothing answers at {address} ({getattr(reason, 'strerror', None) or reason}): "
                      f"start the server or {_OTHER_STORE}")


def _check_database(host: str, port: int) -> None:
    """The store's database server listens at ``host:port`` (a TCP connect, 5 s at most)."""
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise TlpipeError(f"nothing answers at {host}:{port}, the MLflow store's database ({exc.strerror or exc}): "
                          f"start it or {_OTHER_STORE}") from None


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
def _store_lock(uri: str) -> Iterator[None]:
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

    def __init__(self, experiment: str, tracking_uri: str | None = None, run_name: str | None = None):
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.run_id: str | None = None
        self.resume_id: str | None = None  # an earlier run of the same fit to continue, when set before entering
        self.continued = False  # True once entered on resume_id
        self.renamed: dict[str, str] = {}  # MLflow key -> real name, for keys mlflow_key changed
        self.renamed_logged = 0

    def __enter__(self) -> "FitRun":
        if self.run_id is not None:  # made by child() or attach(): already started
            return self
        with _store_lock(self.tracking_uri):
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
        if sqlite_file(self.tracking_uri):
            _write_ahead_log(sqlite_file(self.tracking_uri))
        if found is not None:
            return found.experiment_id
        root = _artifact_root(self.tracking_uri)
        return self.client.create_experiment(self.experiment, artifact_location=f"{root}/{self.experiment}" if root else None)

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


def ui_command(tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The MLflow UI server command line on the same store ``tlpipe fit`` writes to: one worker
    process (one person browsing; MLflow starts four by default)."""
    uri = resolve_tracking_uri(tracking_uri)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def runs_page(tracking_uri: str | None, host: str, port: int) -> str:
    """The UI address of the runs of the experiment logged to last (MLflow 3 opens on pages where no
    runs show); the UI's front page when the store has none."""
    from mlflow.tracking import MlflowClient

    base, uri = f"http://{host}:{port}", resolve_tracking_uri(tracking_uri)
    with _store_lock(uri):
        found = MlflowClient(uri).search_experiments(order_by=["last_update_time DESC"], max_results=1)
    return f"{base}/#/experiments/{found[0].experiment_id}/runs" if found else base


def exposure_warning(host: str, what: str, anyone_can: str) -> str | None:
    """The one warning of ``tlpipe serve`` and ``tlpipe ui`` bound beyond this machine (None on a
    loopback address): neither MLflow server asks who is calling."""
    import ipaddress

    try:
        private = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        private = False
    if private:
        return None
    return (f"warning: {what} on {host} has no authentication: anyone who reaches this machine can {anyone_can}; "
            "leave out --host (127.0.0.1) to keep it private")


def check_port_free(host: str, port: int) -> None:
    """One clear line before anything starts when another process holds the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is not busy
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise TlpipeError(f"cannot serve on {host}:{port} ({exc.strerror or exc}): "
                              "another server holds it; stop it or give --port") from None


def serve_ui(tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run the MLflow UI until interrupted; return its exit code (``run_server``). Check the port
    first (``check_port_free``)."""
    return run_server(ui_command(tracking_uri, host, port), "the MLflow UI")


def run_server(command: list[str], what: str, env: dict[str, str] | None = None) -> int:
    """Run a server until interrupted; return its exit code. The server and its workers run in a
    process group of their own, stopped with tlpipe: on Ctrl+C, SIGTERM, SIGHUP (a closed terminal)
    or any exit; on a SIGKILL of tlpipe too, by the group's ``guard_server``."""
    import signal

    alive, tlpipe_alive = os.pipe()  # tlpipe holds the write end: the kernel closes it however tlpipe ends
    try:
        server = subprocess.Popen([sys.executable, "-c", "from tlpipe.tracking import guard_server; guard_server()",
                                   str(alive), *command], env={**os.environ, **(env or {})},
                                  start_new_session=True, pass_fds=(alive,))
    except OSError as exc:
        os.close(tlpipe_alive)
        raise TlpipeError(f"cannot start {what} ({exc}): is mlflow installed in this environment?") from None
    finally:
        os.close(alive)
    stops = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: sys.exit(0)) for sig in stops}
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_group(server)
        os.close(tlpipe_alive)


def guard_server(grace: float = 10.0) -> None:
    """``python -c ... guard_server() FD COMMAND...``: the leader of a server's process group
    (``run_server``). Runs COMMAND; when FD, a pipe whose write end only tlpipe holds, reads end of
    file, tlpipe is gone (even SIGKILLed, which no handler sees): the whole group is stopped. Else
    exits with the server's code."""
    import select
    import signal

    alive, command = int(sys.argv[1]), sys.argv[2:]
    signal.signal(signal.SIGTERM, lambda *_: None)  # the group's SIGTERM is the server's to obey; exec resets it there
    server = subprocess.Popen(command)
    while server.poll() is None:
        if select.select([alive], [], [], 1.0)[0]:  # nothing is ever written: readable means end of file
            os.killpg(0, signal.SIGTERM)
            try:
                server.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(0, signal.SIGKILL)  # what is left of the group, this guard included
    sys.exit(server.returncode if server.returncode >= 0 else 128 - server.returncode)


def _stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process group; SIGKILL to whatever of it is still there after ``grace`` seconds."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()  # reap the leader, so only live members keep the group
            os.killpg(process.pid, 0)
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group is gone
