"""The MLflow store: where it is (``resolve_tracking_uri``), and whether it can be used, checked in
seconds before any work (``check_store``): a malformed URI, a store that cannot be written or a
server that does not answer is one line, not MLflow's exception or its minutes of retries."""
from __future__ import annotations

import os
import re
import socket
import urllib.parse
from contextlib import closing
from pathlib import Path

from tlpipe.errors import TlpipeError


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
    elif "://" not in uri and uri.lower() not in _BARE_STORES:
        uri = Path(uri).resolve().as_uri()
    return uri


_BARE_STORES = {"databricks", "databricks-uc", "uc"}  # stores MLflow names by scheme alone: no local folder
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
