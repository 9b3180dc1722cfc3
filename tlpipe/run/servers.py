"""The servers tlpipe starts (the MLflow UI, ``mlflow models serve``): bound to 127.0.0.1 unless told
otherwise, warned about when not, in a process group of their own that goes with tlpipe however
tlpipe ends (Ctrl+C, SIGTERM, a closed terminal, even SIGKILL)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlpipe.errors import TlpipeError
from tlpipe.run.store import resolve_tracking_uri
from tlpipe.run.tracking import UI_VIEW, store_lock

# The UI's page on this machine. Browsers resolve every *.localhost name to this machine themselves
# (RFC 6761), so no DNS answer can rebind it; MLflow offers its Assistant, and opens its panel over a
# quarter of the page unasked, only on a page named localhost, 127.0.0.1 or ::1.
UI_LOCAL_NAME = "tlpipe.localhost"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")  # the server at these answers UI_LOCAL_NAME too


def ui_command(tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The MLflow UI server command line on the same store ``tlpipe fit`` writes to: one worker
    process (one person browsing; MLflow starts four by default)."""
    uri = resolve_tracking_uri(tracking_uri)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def ui_environment(host: str) -> dict[str, str]:
    """The UI server's environment: on a local ``host``, MLflow's host and origin checks (its
    defaults, any port, as a tunnel needs) let pages named ``UI_LOCAL_NAME`` in as well. Environment
    variables, not flags: MLflow before 3.5 has no such flags and ignores them. A value the user set stays."""
    if host not in LOCAL_NAMES:
        return {}
    hosts = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[[]::1]", "[[]::1]:*", UI_LOCAL_NAME, f"{UI_LOCAL_NAME}:*"]
    origins = [f"http://{UI_LOCAL_NAME}", f"http://{UI_LOCAL_NAME}:*"]
    return {name: ",".join(filter(None, [os.environ.get(name), *ours]))
            for name, ours in (("MLFLOW_SERVER_ALLOWED_HOSTS", hosts), ("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS", origins))}


def address(host: str, port: int, page: bool = False) -> str:
    """``http://HOST:PORT`` of a server bound to ``host`` (an IPv6 address in brackets); ``page``:
    as the UI's page is named (``UI_LOCAL_NAME`` on a local host)."""
    if page and host in LOCAL_NAMES:
        host = UI_LOCAL_NAME
    return f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}"


def runs_page(tracking_uri: str | None, host: str, port: int) -> str:
    """The UI address of the runs of the experiment logged to last (MLflow 3 opens on pages where no
    runs show); the UI's front page when the store has none."""
    from mlflow.tracking import MlflowClient

    base, uri = address(host, port, page=True), resolve_tracking_uri(tracking_uri)
    with store_lock(uri):
        found = MlflowClient(uri).search_experiments(order_by=["last_update_time DESC"], max_results=1)
    if not found:
        return base
    page = f"{base}/#/experiments/{found[0].experiment_id}/runs?workflowType=machine_learning"
    return page + (f"&viewStateShareKey={UI_VIEW}" if f"mlflow.sharedViewState.{UI_VIEW}" in found[0].tags else "")


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
            probe.bind((host.strip("[]"), port))  # [::1], as a URL writes it, is the address ::1
        except socket.gaierror as exc:
            raise TlpipeError(f"cannot serve on {host} ({exc.strerror}): give --host an address or name of this "
                              "machine (127.0.0.1 keeps it private)") from None
        except OSError as exc:
            raise TlpipeError(f"cannot serve on {host}:{port} ({exc.strerror or exc}): "
                              "another server holds it; stop it or give --port") from None


def ui_store(output: Path | None, tracking_uri: str | None) -> tuple[str, bool]:
    """The store the UI shows (``--tracking-uri``, else the fit ``output`` logged to, else the one a
    fit here would use) and whether it holds any run. MLflow's default store (no URI given) that is
    not there is one line: MLflow would make an empty one, and the UI would open on nothing."""
    from mlflow.tracking import MlflowClient

    from tlpipe.run.folder import RunFolder
    from tlpipe.run.store import check_store, sqlite_file

    if output is not None and not tracking_uri:
        tracking_uri = RunFolder(output.expanduser()).read_summary()["tracking_uri"]
    uri = check_store(tracking_uri)  # a malformed URI, a store that cannot be written: one line
    implicit = not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if implicit and (db := sqlite_file(uri)) and not db.is_file():
        raise TlpipeError(f"no MLflow store at {db}: tlpipe fit logs to mlflow.db in the folder it ran in (or to "
                          "MLFLOW_TRACKING_URI); run tlpipe ui there, or tlpipe ui FIT_OUTPUT, or give --tracking-uri")
    with store_lock(uri):
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        return uri, bool(experiments and client.search_runs(experiments, max_results=1))


def serve_ui(tracking_uri: str | None, host: str = "127.0.0.1", port: int = 5000, quiet: bool = False) -> int:
    """Run the MLflow UI until interrupted; return its exit code (``run_server``). Check the port
    first (``check_port_free``). ``quiet``: the server's lines (start-up notices, one per request)
    go to a log file, whose end is shown if the server fails."""
    return run_server(ui_command(tracking_uri, host, port), "the MLflow UI", env=ui_environment(host),
                      log=_private_folder() / f"ui-{port}.log" if quiet else None)


def _private_folder() -> Path:
    """``$TMPDIR/tlpipe-<uid>``, this user's alone: no other user's file, or a link planted in a
    shared /tmp, is ever opened for writing."""
    folder = Path(tempfile.gettempdir()) / f"tlpipe-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        mine = not folder.is_symlink() and folder.stat().st_uid == os.getuid()
    except OSError as exc:
        raise TlpipeError(f"cannot make {folder} for the server's log ({exc.strerror or exc}): set TMPDIR to a folder of yours") from None
    if not mine:
        raise TlpipeError(f"{folder} is not yours (another user's, or a link): remove it, or set TMPDIR to a folder of yours")
    return folder


def run_server(command: list[str], what: str, env: dict[str, str] | None = None, log: Path | None = None) -> int:
    """Run a server until interrupted; return its exit code. The server and its workers run in a
    process group of their own, stopped with tlpipe: on Ctrl+C, SIGTERM, SIGHUP (a closed terminal)
    or any exit; on a SIGKILL of tlpipe too, by the group's ``guard_server``. ``log``: a file for
    the server's output instead of the terminal."""
    import signal

    alive, tlpipe_alive = os.pipe()  # tlpipe holds the write end: the kernel closes it however tlpipe ends
    sink = log.open("w") if log else None
    try:
        server = subprocess.Popen([sys.executable, "-c", "from tlpipe.run.servers import guard_server; guard_server()",
                                   str(alive), *command], env={**os.environ, **(env or {}), "PATH": _scripts_first()},
                                  start_new_session=True, pass_fds=(alive,), stdout=sink, stderr=sink and subprocess.STDOUT)
    except OSError as exc:
        os.close(tlpipe_alive)
        raise TlpipeError(f"cannot start {what} ({exc}): is mlflow installed in this environment?") from None
    finally:
        os.close(alive)
        if sink:
            sink.close()
    stops = (signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda *_: sys.exit(0)) for sig in stops}
    try:
        code = server.wait()
        if code and log:  # the server failed: what it said, which the terminal did not see
            sys.stderr.write(f"{what} stopped (exit {code}); the end of its log {log}:\n"
                             + "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]))
        return code
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_group(server)
        os.close(tlpipe_alive)


def _scripts_first() -> str:
    """``PATH`` with this environment's scripts folder first: MLflow starts ``uvicorn`` and ``gunicorn``
    by name, which an environment that was never activated (pipx, a venv's tlpipe called by its
    absolute path) does not put on ``PATH``."""
    import sysconfig

    return os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", os.defpath)])


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
