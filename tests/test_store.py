"""A store MLflow cannot use is one line before the data check and model loading: no output
folder, no model, seconds rather than MLflow's exception (or its retries) minutes later."""
from __future__ import annotations

import os
import time

import pytest

from conftest import FAST, dataset, free_port, one_line, tlpipe


def fit_on(tmp_path, uri: str, *fragments: str) -> None:
    """``tlpipe fit`` on ``uri``: one line holding ``fragments``, within seconds, nothing written."""
    from tlpipe import pipeline  # noqa: F401 (torch and timm: seconds to import once, not the check's)

    root, out = dataset(tmp_path / "d", ["cats", "dogs"]), tmp_path / "out"
    start = time.monotonic()
    one_line(tlpipe("fit", root, "-o", out, "--tracking-uri", uri, *FAST), *fragments)
    assert time.monotonic() - start < 10
    assert not out.exists()  # the check came first


def test_a_store_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    fit_on(tmp_path, f"sqlite:///{tmp_path / 'afile' / 'x.db'}", f"{tmp_path / 'afile'} is a file", "--tracking-uri")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_store_folder_is_one_line(tmp_path):
    store = tmp_path / "store"
    store.mkdir(mode=0o555)
    try:
        fit_on(tmp_path, f"sqlite:///{store / 'mlflow.db'}", f"{store} is read-only", "--tracking-uri")
    finally:
        store.chmod(0o755)


def test_a_folder_store_that_mlflow_refuses_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    fit_on(tmp_path, str(tmp_path / "mlruns"), "MLFLOW_ALLOW_FILE_STORE=true", "sqlite:///mlflow.db")


@pytest.mark.parametrize("uri", ["sqlite:/x.db", "sqlite://x.db"])
def test_a_sqlite_typo_is_one_line_giving_the_right_form(tmp_path, uri):
    fit_on(tmp_path, uri, f"'{uri}' is malformed", "sqlite:////abs/path/mlflow.db", "sqlite:///relative.db")


def test_an_http_store_with_nothing_listening_is_one_line_within_seconds(tmp_path):
    port = free_port()  # free once closed: nothing listens there
    fit_on(tmp_path, f"http://127.0.0.1:{port}", f"nothing answers at http://127.0.0.1:{port}", "start the server")


def test_ui_and_serve_check_their_store_first_too(tmp_path):
    start = time.monotonic()
    one_line(tlpipe("ui", "--tracking-uri", "sqlite:/x.db", "--port", free_port()), "'sqlite:/x.db' is malformed")
    port = free_port()
    one_line(tlpipe("serve", f"runs:/{'0' * 32}/model", "--tracking-uri", f"http://127.0.0.1:{port}"),
             f"nothing answers at http://127.0.0.1:{port}")
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("name", ["databricks", "databricks-uc"])
def test_a_store_named_by_its_scheme_alone_is_not_taken_for_a_local_folder(tmp_path, monkeypatch, name):
    from tlpipe.run.store import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(name) == name  # MLflow's Databricks store, not file://.../databricks
