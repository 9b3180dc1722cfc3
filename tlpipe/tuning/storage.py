"""Where a study lives (SQLite, or an Optuna RDB shared by several processes), the queue that holds
it to its count, creating or joining it, and the names of what tlpipe records on a study and its trials."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial

from tlpipe.config import FitConfig, fit_identity
from tlpipe.errors import TlpipeError
from tlpipe.run.folder import RunFolder

STUDY_DB = RunFolder.STUDY_DB
PRUNED_REASON = "pruned_reason"  # trial user attr: why it was pruned
DID_NOT_LEARN_ATTR = "did_not_learn"  # trial user attr: pruned because its run did not learn (not by the pruner)
_SLOT = "tlpipe_slot"  # user attr of every queued trial (retries inherit it)
WORKER_ATTR = "tlpipe_worker"  # user attr: host:pid that ran the trial
_LEAD_RUN = "tlpipe_lead_run"  # study user attrs: the lead's MLflow run, and the config it runs
_CONFIG = "tlpipe_config"


class QueueEmpty(Exception):
    """``study.ask()`` found no queued trial: this process's share of the study is done."""


class _QueueStorage(optuna.storages.RDBStorage):
    """An RDBStorage that creates only the trials it is handed (queued ones, and retries of dead
    ones): a bare ``study.ask()`` raises ``QueueEmpty`` instead of starting a trial nobody asked for.

    Creating a trial is the one step of Optuna's loop that is atomic across processes, so this is
    what holds several processes to exactly the requested count: checking a count first and then
    asking (``MaxTrialsCallback``) overshoots by up to one trial per process (optuna #1883, #3518).
    ``_create_new_trial`` is the method both ``create_new_trial`` and Optuna's storage cache call;
    ``tests/test_tuning.py`` fails if an Optuna release stops calling it."""

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if template_trial is None:
            raise QueueEmpty
        return super()._create_new_trial(study_id, template_trial)


def storage_url(output_dir: Path | None, storage: str | None = None) -> str:
    """``storage``, else ``sqlite:///<output>/optuna.db``."""
    if storage:
        return storage
    if output_dir is None:
        raise TlpipeError("the Optuna study needs an output folder (for optuna.db) or a storage URL")
    return f"sqlite:///{(Path(output_dir) / STUDY_DB).resolve()}"


@contextmanager
def _quiet() -> Iterator[None]:
    """Heartbeat, retries and the matplotlib plots are 'experimental' in Optuna: no warning each time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str, config: FitConfig) -> _QueueStorage:
    """The study database at ``url``, its tables made if new; ``close_storage`` when done."""
    from sqlalchemy.exc import SQLAlchemyError

    tuning = config.tuning
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = {"creator": _sqlite_connector(path)}
    else:
        engine = {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with _quiet():
                return _QueueStorage(
                    url, engine_kwargs=engine, heartbeat_interval=tuning.heartbeat_interval,
                    grace_period=tuning.grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=tuning.max_retry, inherit_intermediate_values=True),
                )
        except SQLAlchemyError as exc:  # processes creating the tables at the same moment (optuna #4621)
            if attempt == 4:
                raise TlpipeError(f"cannot open the Optuna storage {_safe_url(url)}: {str(exc).splitlines()[0]}") from None
            time.sleep(0.5 * (attempt + 1))


def close_storage(storage: optuna.storages.RDBStorage) -> None:
    """Close the storage's connections. On SQLite the last one to close folds the write-ahead log into
    optuna.db and deletes optuna.db-wal and -shm: left open until the process ended, they stayed, and
    optuna.db alone held none of the trials (4 KB beside a 968 KB log). Reading the study again reconnects."""
    storage.remove_session()
    storage.engine.dispose()


def _sqlite_connector(path: Path) -> Callable[[], Any]:
    """SQLite connections in WAL mode with ``synchronous=NORMAL``: a commit no longer waits for the
    disk (each trial makes a few dozen; 11 ms each here), and a killed process still loses nothing
    committed. The 60 s timeout covers the heartbeat thread writing at the same moment."""
    import sqlite3

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return connect


def _safe_url(url: str) -> str:
    """The URL without its password, for logs and MLflow."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy reads: show only its scheme
        return url.split("://")[0] + "://..."


def default_study_name(config: FitConfig, data: str | None = None) -> str:
    """``tlpipe-<strategy>-<hash>`` of everything that changes what a trial measures, the recipe and
    the ``data`` (``DatasetSpec.identity``), so re-running the same fit continues its study, and a
    changed recipe or dataset starts a new one (two datasets never share a study in one storage)."""
    return f"tlpipe-{config.strategy}-{fit_identity(config, 'study', data=data)[:12]}"


def make_pruner(config: FitConfig) -> optuna.pruners.BasePruner:
    tuning = config.tuning
    if tuning.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tuning.pruner_startup_trials,
                                           n_warmup_steps=tuning.pruner_warmup_epochs)
    if tuning.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, tuning.pruner_warmup_epochs),
                                              max_resource=config.finetune.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(config: FitConfig, output_dir: Path | None = None, *,
               storage: str | optuna.storages.RDBStorage | None = None, study_name: str | None = None,
               worker: bool = False, data: str | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (a re-run, or another process created it first).

    ``storage`` (a URL, or one ``open_storage`` opened) / ``study_name`` override ``config.tuning``'s
    (the default name is of the config and the ``data`` identity); the default storage is ``<output_dir>/optuna.db``. The sampler is TPE seeded with ``config.seed``;
    a worker's is unseeded, or it would draw the lead's very trials."""
    from sqlalchemy.exc import SQLAlchemyError

    if not isinstance(storage, optuna.storages.RDBStorage):
        storage = open_storage(storage_url(output_dir, storage or config.tuning.storage), config)
    name = study_name or config.tuning.study_name or default_study_name(config, data)
    sampler = optuna.samplers.TPESampler(seed=None if worker else config.seed,
                                         n_startup_trials=config.tuning.sampler_startup_trials)
    kwargs = dict(study_name=name, storage=storage, sampler=sampler,
                  pruner=make_pruner(config), direction="maximize")
    for attempt in range(5):
        try:
            return optuna.create_study(load_if_exists=True, **kwargs)
        except (optuna.exceptions.DuplicatedStudyError, SQLAlchemyError):  # lost the race to create it
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def join_study(storage: str, study_name: str) -> tuple[optuna.Study, FitConfig]:
    """For a worker process: the lead's study and the config the lead runs it with."""
    try:
        attrs = optuna.load_study(study_name=study_name, storage=storage).user_attrs
    except KeyError:
        raise TlpipeError(f"no study '{study_name}' in {_safe_url(storage)}: start the lead fit first") from None
    if _CONFIG not in attrs:
        raise TlpipeError(f"study '{study_name}' in {_safe_url(storage)} was not started by tlpipe fit")
    config = FitConfig.model_validate(attrs[_CONFIG])
    return open_study(config, storage=storage, study_name=study_name, worker=True), config


def trial_dir(output_dir: Path, trial: optuna.Trial | FrozenTrial) -> Path:
    """``<output>/trials/<n>``: a fine-tuning trial's checkpoints. A retry of a dead trial uses the
    original's number, so it resumes the epochs already done."""
    if not isinstance(trial, FrozenTrial):
        trial = trial.study.get_trials(deepcopy=False)[trial.number]  # numbers are dense: 0, 1, ...
    with _quiet():
        root = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return Path(output_dir) / "trials" / str(trial.number if root is None else root)
