"""``tlpipe serve`` and ``tlpipe ui`` as a hostile user meets them: a model the store does not hold,
or whose stored tlpipe code was changed, is one line before anything starts; the server goes with
tlpipe even when tlpipe is SIGKILLed; a request has a row cap; a server bound beyond this machine
is warned about. The fit, the store and the servers are real."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, health_status, one_line, servers_on, tlpipe


def _logged_model_folder(out: Path) -> Path:
    """The folder of the store holding the fit's MLflow model: what someone with access to the store could edit."""
    from mlflow.tracking import MlflowClient

    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(summary["tracking_uri"])
    experiment = client.get_run(summary["run_id"]).info.experiment_id
    [model] = client.search_logged_models([experiment], filter_string=f"source_run_id = '{summary['run_id']}'")
    return Path(urllib.request.url2pathname(model.artifact_location.removeprefix("file://")))


UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("uri, why", [(f"runs:/{UNKNOWN_RUN}/model", f"Run with id={UNKNOWN_RUN} not found"),
                                      ("models:/NOSUCH@champion", "Registered Model with name=NOSUCH not found")])
def test_a_model_the_store_does_not_hold_is_one_line_before_serving(bundle_dir, mlflow_store, uri, why):
    one_line(tlpipe("serve", uri), f"cannot serve {uri} from the MLflow store {mlflow_store}: {why}", "--tracking-uri")


def test_a_fit_whose_run_was_deleted_is_one_line_before_serving(bundle_dir, mlflow_store):
    from mlflow.tracking import MlflowClient

    out = bundle_dir[1].parent
    run_id = json.loads((out / "summary.json").read_text())["run_id"]
    client = MlflowClient(mlflow_store)
    client.delete_run(run_id)
    try:
        one_line(tlpipe("serve", out), f"cannot serve runs:/{run_id}/model: its run is deleted",
                 f"mlflow runs restore --run-id {run_id}")
    finally:
        client.restore_run(run_id)


EDITS = {  # stored file, its edit, what the line says
    "a module": ("code/tlpipe/bundle/serving.py", lambda text: text + "\nimport os\nos.system('true')\n",
                 "the checksum of its files differs"),
    "the version": ("code/tlpipe/version.py", lambda text: text.replace('__version__ = "', '__version__ = "9.'), "tlpipe 9."),
    "the model's code file": ("mlflow_model.py", lambda text: text + "\n# edited\n", "the model's mlflow_model.py differs"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_stored_tlpipe_code_that_was_changed_is_refused_before_serving(bundle_dir, edit):
    out = bundle_dir[1].parent
    path, change, message = EDITS[edit]
    stored = _logged_model_folder(out) / path
    original = stored.read_bytes()
    stored.write_text(change(original.decode()))
    try:
        one_line(tlpipe("serve", out), "the tlpipe code stored with it", "is not the code the fit logged", message)
    finally:
        stored.write_bytes(original)


def test_a_request_over_the_row_cap_is_one_400_line(bundle_dir, monkeypatch):
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from tlpipe.bundle import load_bundle
    from tlpipe.bundle.serving import MAX_ROWS_ENV, BundleModel

    root, bundle = bundle_dir
    model = BundleModel()
    model.bundle = load_bundle(bundle, "cpu")
    image = (root / "cats" / "0.jpg").read_bytes()
    monkeypatch.delenv(MAX_ROWS_ENV, raising=False)
    with pytest.raises(MlflowException) as refused:
        model.predict(None, pd.DataFrame({"image": [image] * 257}))
    assert refused.value.get_http_status_code() == 400
    assert refused.value.message == ("257 rows in one request, more than the 256 this server takes: send at most 256 "
                                     "per request (or serve with a larger tlpipe serve --max-rows)")
    monkeypatch.setenv(MAX_ROWS_ENV, "2")
    assert list(model.predict(None, pd.DataFrame({"image": [image] * 2}))["label"]) == ["cats", "cats"]
    with pytest.raises(MlflowException, match=r"^3 rows in one request, more than the 2 this server takes"):
        model.predict(None, pd.DataFrame({"image": [image] * 3}))


def _post(port: int, images: list[bytes], params: dict | None = None) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(i).decode()] for i in images]},
                       **({"params": params} if params else {})})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _group_members(group: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group ``group``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgid = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgid) == group and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _listening(port: int) -> bool:
    """Whether any socket on this machine listens on TCP ``port`` (IPv4 or IPv6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":  # 0A: TCP_LISTEN
                return True
    return False


def _sigkill_leaves_no_server(process: subprocess.Popen, port: int) -> None:
    """SIGKILL ``process`` (tlpipe): within 15 s every process of its server's group (the server, its
    workers, MLflow's job consumers) is gone and nothing listens on ``port``. (A bind probe is no
    check: the killed server's closing connections may hold the port a while without serving it.)"""
    groups = {os.getpgid(pid) for pid in servers_on(port)}
    assert groups and os.getpgid(0) not in groups and _listening(port)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (any(map(_group_members, groups)) or _listening(port)):
        time.sleep(0.5)
    assert [pid for group in groups for pid in _group_members(group)] == []
    assert not _listening(port)


def _stop(process: subprocess.Popen, port: int) -> None:
    """Whatever a failed test left running: tlpipe and its server's group."""
    process.kill()
    for pid in servers_on(port):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_sigkilled_tlpipe_serve_takes_its_server_along_and_the_row_cap_holds(bundle_dir, tmp_path):
    """Launched as pipx or an absolute path does: the environment's ``tlpipe`` script, not activated
    (its bin/ not on a minimal PATH), so MLflow's own server scripts must be found without it.
    With --no-reject no image is flagged unknown, even one a request asks about."""
    root, bundle = bundle_dir
    port, log = free_port(), tmp_path / "serve.log"
    script, env = Path(sys.executable).parent / "tlpipe", {**os.environ, "PATH": "/usr/bin:/bin"}
    with log.open("w") as sink:
        serve = subprocess.Popen([str(script), "serve", str(bundle.parent), "--port", str(port), "--max-rows", "1",
                                  "--no-reject"], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        assert health_status(port, timeout=120) == 200, log.read_text()[-2000:]
        image = (root / "cats" / "0.jpg").read_bytes()
        status, answer = _post(port, [image, image])
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert answer["message"].splitlines()[-1] == ("Error: 2 rows in one request, more than the 1 this server takes: "
                                                      "send at most 1 per request (or serve with a larger tlpipe serve --max-rows)")
        board = tmp_path / "board.png"  # of no class the model knows: predict flags it
        Image.fromarray(((np.indices((40, 32)).sum(axis=0) // 2) % 2 * 255).astype(np.uint8)).convert("RGB").save(board)
        assert json.loads(tlpipe("predict", bundle, board, "--format", "json", "--workers", "0").stdout)[0]["unknown"]
        answers = [_post(port, [board.read_bytes()], params)[1]["predictions"][0] for params in (None, {"reject": True})]
        assert [a["unknown"] for a in answers] == [False, False] and answers[0]["unknown_score"] > 0
        _sigkill_leaves_no_server(serve, port)
    finally:
        _stop(serve, port)


def test_tlpipe_ui_on_all_interfaces_warns_and_a_sigkill_takes_its_server_along(mlflow_store, tmp_path):
    port, errors = free_port(), tmp_path / "ui.err"
    with errors.open("w") as sink:
        ui = subprocess.Popen([sys.executable, "-m", "tlpipe", "ui", "--host", "0.0.0.0", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=sink)
    try:
        assert health_status(port) == 200, errors.read_text()[-2000:]
        assert ("warning: the MLflow UI on 0.0.0.0 has no authentication: anyone who reaches this machine can read, change "
                "and delete every run in the store; leave out --host (127.0.0.1) to keep it private") in errors.read_text().splitlines()
        _sigkill_leaves_no_server(ui, port)
    finally:
        _stop(ui, port)


def test_tlpipe_ui_opens_on_the_runs_with_their_scores_in_a_real_browser(bundle_dir, tmp_path):
    """After a fit, the page tlpipe ui prints, rendered by headless Chromium: the model-training view
    (no GenAI navigation, no Assistant panel) with the val accuracy and strategy columns; MLflow's log
    lines stay out of the terminal."""
    import re
    import shutil
    import urllib.request

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    port, printed = free_port(), tmp_path / "ui.out"
    with printed.open("w") as sink:
        ui = subprocess.Popen([sys.executable, "-m", "tlpipe", "ui", str(bundle_dir[1].parent), "--port", str(port)],
                              stdout=sink, stderr=subprocess.STDOUT)
    try:
        assert health_status(port) == 200, printed.read_text()[-2000:]
        [page] = re.findall(r"MLflow UI on (\S+) for ", printed.read_text())
        render = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", "--virtual-time-budget=20000"]
        dom = subprocess.run([*render, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
        subprocess.run([*render, f"--screenshot={tmp_path / 'ui.png'}", page], capture_output=True, timeout=120)
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
        assert "val_accuracy" in text and "strategy" in text and "linear" in text, text[-3000:]
        assert "Judges" not in text and "Prompts" not in text  # the GenAI navigation
        assert "data-assistant-ui" not in dom and "Assistant" not in text  # nor MLflow's Assistant panel, opened unasked on localhost
        tunnel = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Host": "localhost:8080"})
        assert urllib.request.urlopen(tunnel, timeout=30).status == 200  # a tunnel's port is let in, as MLflow does
        assert (tmp_path / "ui.png").stat().st_size > 10_000
        assert len(printed.read_text().splitlines()) == 1, printed.read_text()  # the one line, no server noise
    finally:
        _stop(ui, port)


def test_the_ui_page_is_named_tlpipe_localhost_only_on_a_local_host_and_what_the_user_allowed_stays(monkeypatch):
    from tlpipe.run.servers import address, ui_environment

    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", "mlflow.example.com")
    hosts = ui_environment("127.0.0.1")["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert hosts[0] == "mlflow.example.com" and {"localhost:*", "tlpipe.localhost:*"} <= set(hosts)
    assert ui_environment("0.0.0.0") == {} and ui_environment("127.0.0.2") == {}  # no page name to let in there
    assert address("::1", 5000) == "http://[::1]:5000" and address("::1", 5000, page=True) == "http://tlpipe.localhost:5000"
    assert address("127.0.0.2", 5000, page=True) == "http://127.0.0.2:5000"


def test_tlpipe_ui_where_no_fit_ran_says_where_the_store_is_instead_of_making_an_empty_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-m", "tlpipe", "ui"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in result.stderr and "tlpipe ui FIT_OUTPUT" in result.stderr
    assert list(tmp_path.iterdir()) == []
