"""Optuna studies shared by processes on a real PostgreSQL server: exactly the requested trials,
none lost or run twice, and a worker killed mid-trial is caught by the heartbeat.

``.ci/run`` starts a throwaway server and sets TLPIPE_TEST_POSTGRES_URL; without it, or without a
server answering there, these tests skip, saying why. Each test works in a database of its own.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from optuna.trial import TrialState

from tlpipe import tuning
from tlpipe.config import load_config

URL_VARIABLE = "TLPIPE_TEST_POSTGRES_URL"
TESTS = Path(__file__).resolve().parent
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture
def postgres_url():
    """A URL to a new, empty database on the test server, dropped afterwards."""
    url = os.environ.get(URL_VARIABLE)
    if not url:
        pytest.skip(f"{URL_VARIABLE} is not set: .ci/run starts a PostgreSQL server and sets it")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.skip("psycopg2 is not installed: pip install -e '.[test]' installs it")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    name = f"tlpipe_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"no PostgreSQL server answers at {make_url(url).render_as_string(hide_password=True)}: "
                    f"{str(exc.orig).strip().splitlines()[0]}")
    yield make_url(url).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def config(**tuning_values):
    return load_config("default", strategy="partial", tuning={"pruner_startup_trials": 2, **tuning_values})


# Each process: join the study (a worker), wait for the go file, then open the study (role open) or run it.
PROCESS = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_tuning import curve_objective
from tlpipe import tuning
from tlpipe.config import load_config

tests, url, name, go, role = sys.argv[1:6]

def objective(trial, config, on_epoch):
    if role == "dies":  # its first trial: say which, then wait to be killed
        Path(go + ".dying").write_text(str(trial.number))
        time.sleep(600)
    def slow(epoch, metrics):  # long enough for the processes' trials to overlap
        time.sleep(0.1)
        on_epoch(epoch, metrics)
    return curve_objective(trial, config, slow)

if role != "open":
    study, config = tuning.join_study(url, name)
Path(go + "." + role + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.02)
if role == "open":
    config = load_config("default", strategy="partial")
    print(tuning.open_study(config, storage=url, study_name=name).study_name)
else:
    tuning.run_study(study, objective, config, worker=True)
"""


def start(url, name, go, role):
    return subprocess.Popen([sys.executable, "-c", PROCESS, str(TESTS), url, name, str(go), role],
                            stdout=subprocess.PIPE, text=True)


def release(go: Path, roles, processes):
    """Start the processes' work at the same moment, once each has imported everything."""
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.{role}.ready").exists() for role in roles):
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline, "a process did not start"
        time.sleep(0.05)
    go.touch()


def test_processes_creating_the_tables_and_the_study_at_once_share_one(postgres_url, tmp_path):
    go = tmp_path / "go"
    processes = [start(postgres_url, "race", go, role) for role in ("open", "open")]
    release(go, ["open"], processes)
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0]  # neither lost the race with an error
    assert [out.split()[-1] for out in outputs] == ["race", "race"]
    import optuna

    assert optuna.get_all_study_names(postgres_url) == ["race"]  # one study, created once


def test_two_workers_run_exactly_the_queued_trials(postgres_url, tmp_path):
    cfg = config()
    study = tuning.open_study(cfg, storage=postgres_url, study_name="shared")
    assert tuning.prepare_study(study, cfg, trials=12) == 12
    go = tmp_path / "go"
    workers = [start(postgres_url, "shared", go, role) for role in ("one", "two")]
    release(go, ["one", "two"], workers)
    for worker in workers:
        worker.communicate(timeout=300)
    assert [w.returncode for w in workers] == [0, 0]

    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(12))  # none lost, none created twice
    assert all(t.state in FINISHED for t in trials), [t.state.name for t in trials]
    assert trials[0].params == tuning.default_params(cfg)
    ran = {t.user_attrs[tuning.WORKER_ATTR] for t in trials}
    assert len(ran) == 2  # both workers took trials
    tuning.run_study(study, tuning_objective_never_called, cfg, trials=12)  # the lead: nothing left to run
    assert len(study.get_trials(deepcopy=False)) == 12


def tuning_objective_never_called(trial, config, on_epoch):
    raise AssertionError("the study had no trial left to run")


def test_a_worker_killed_mid_trial_is_caught_by_the_heartbeat(postgres_url, tmp_path):
    from test_tuning import curve_objective

    cfg = config(heartbeat_interval=1, grace_period=3)
    study = tuning.open_study(cfg, storage=postgres_url, study_name="heartbeat")
    tuning.prepare_study(study, cfg, trials=6)
    go = tmp_path / "go"
    dies, survives = start(postgres_url, "heartbeat", go, "dies"), start(postgres_url, "heartbeat", go, "lives")
    release(go, ["dies", "lives"], [dies, survives])
    deadline = time.monotonic() + 120
    while not Path(f"{go}.dying").exists() or not Path(f"{go}.dying").read_text():
        assert dies.poll() is None and time.monotonic() < deadline, "the worker never started a trial"
        time.sleep(0.05)
    killed = int(Path(f"{go}.dying").read_text())
    dies.send_signal(signal.SIGKILL)
    dies.wait()
    survives.communicate(timeout=300)

    # The killed trial stays RUNNING until its heartbeat is 3 s old: then the survivor, or the lead
    # here, fails it, queues it again and runs it.
    tuning.run_study(study, curve_objective, cfg, trials=6)
    trials = study.get_trials(deepcopy=False)
    assert trials[killed].state == TrialState.FAIL
    assert sum(t.state in FINISHED for t in trials) == 6 and len(trials) == 7
    retry = trials[-1]
    assert retry.system_attrs["failed_trial"] == killed and retry.state in FINISHED
    assert retry.params == trials[killed].params  # drawn before the objective ran, so the retry repeats it
