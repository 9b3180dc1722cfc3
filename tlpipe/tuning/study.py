"""Running a study: the lead queues the trials it lacks, every process runs queued ones, each trial
reports its epochs to the pruner and logs to its own nested MLflow run. ``tune`` is the lead's whole part."""
from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from tlpipe.config import FitConfig
from tlpipe.progress import progress_bar
from tlpipe.run.tracking import FitRun
from tlpipe.tuning.results import log_study, score_name
from tlpipe.tuning.space import best_config, default_params, requested_trials, suggest_config
from tlpipe.tuning.storage import (
    _CONFIG, _LEAD_RUN, _SLOT, DID_NOT_LEARN_ATTR, WORKER_ATTR, PRUNED_REASON, QueueEmpty, _quiet, close_storage, open_storage, open_study,
    storage_url, trial_dir,
)

STATE_TAG = "optuna_state"  # tag on each trial's MLflow run: COMPLETE, PRUNED or FAILED
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_MLFLOW_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAILED": "FAILED", "KILLED": "KILLED"}

Objective = Callable[[optuna.Trial, FitConfig, "EpochReporter"], float]


def _count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def queue_trials(study: optuna.Study, trials: int, defaults: dict[str, Any] | None = None) -> int:
    """Queue the trials the study lacks: ``trials`` - finished (complete or pruned) - those already
    queued or running. A new study's first trial gets ``defaults`` (the recipe's own configuration);
    the others are drawn by the sampler when they start. Returns how many were queued."""
    pending = _count(study, *_FINISHED, TrialState.WAITING, TrialState.RUNNING)
    missing = trials - pending
    if missing <= 0:
        return 0
    fresh = not study.get_trials(deepcopy=False)
    for i in range(missing):
        study.enqueue_trial(defaults if fresh and i == 0 and defaults else {}, user_attrs={_SLOT: True})
    return missing


def _requeue_dead(study: optuna.Study, max_retry: int) -> None:
    """Trials left RUNNING in a study that only this process uses belong to a killed run: fail them
    and queue them again now (the heartbeat would, after its grace period)."""
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        retry(study, study.get_trials(deepcopy=True)[trial.number])


class EpochReporter:
    """``on_epoch(epoch, metrics)`` for one trial (``fit_finetune``'s callback): logs the epoch's
    metrics to the trial's MLflow run, reports ``metrics[metric]`` to Optuna and raises
    ``optuna.TrialPruned``, which stops the training, when the pruner says so."""

    def __init__(self, trial: optuna.Trial, run: Any = None, metric: str = "val_accuracy"):
        self.trial, self.run, self.metric = trial, run, metric

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step=epoch)
        value = float(metrics[self.metric])
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            reason = f"{type(self.trial.study.pruner).__name__} at epoch {epoch}: {self.metric} {value:.4f}"
            self.trial.set_user_attr(PRUNED_REASON, reason)
            raise optuna.TrialPruned(reason)


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _TrialRun:
    """A trial's nested MLflow run, started when first needed: at its first epoch's metrics, else at
    its end, so a millisecond linear trial costs three calls to the store (create, log, end)."""

    def __init__(self, parent: FitRun, trial: optuna.Trial):
        self.parent, self.trial, self.run = parent, trial, None
        self.tags = {"optuna_study": trial.study.study_name, "optuna_trial": str(trial.number)}

    def _start(self, tags: dict[str, str] | None = None) -> FitRun:
        if self.run is None:
            self.run = self.parent.child(f"trial-{self.trial.number}", {**self.tags, **(tags or {})})
        return self.run

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.run is None:
            self._start().log_batch(params=self.trial.params, metrics=metrics, step=step)
        else:
            self.run.log_metrics(metrics, step=step)

    def finish(self, state: str, value: float | None, reason: str | None) -> None:
        tags = {STATE_TAG: state, **({PRUNED_REASON: reason} if reason else {})}
        metrics = {"objective": value} if value is not None else {}
        if self.run is None:
            self._start(tags).log_batch(params=self.trial.params, metrics=metrics)
        else:
            self.run.log_batch(metrics=metrics, tags=tags)
        self.run.end(_MLFLOW_STATUS[state])


def _trial_function(study: optuna.Study, objective: Objective, config: FitConfig,
                    parent: FitRun | None) -> Callable[[optuna.Trial], float]:
    def run_trial(trial: optuna.Trial) -> float:
        if not trial.user_attrs.get(_SLOT):  # only if Optuna ever bypassed _QueueStorage
            study.stop()
            trial.set_user_attr(PRUNED_REASON, "not a queued trial: the study has all it asked for")
            raise optuna.TrialPruned("not a queued trial")
        trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
        trial_config = suggest_config(trial, config)
        run = _TrialRun(parent, trial) if parent is not None else None
        state, value, reason = "FAILED", None, None
        try:
            value = float(objective(trial, trial_config, EpochReporter(trial, run)))
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state, reason = "PRUNED", trial.user_attrs.get(PRUNED_REASON)
            raise
        except torch.cuda.OutOfMemoryError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
            state, reason = "PRUNED", f"CUDA out of memory: {detail}"
            trial.set_user_attr(PRUNED_REASON, reason)
            _free_cuda()
            raise optuna.TrialPruned(reason) from None
        except BaseException as exc:
            if not isinstance(exc, Exception):  # stopped from outside: SIGTERM, Ctrl+C
                state = "KILLED"
            raise
        finally:
            if run is not None:
                run.finish(state, value, reason)

    return run_trial


def _lead_run(study: optuna.Study) -> FitRun | None:
    lead = study.user_attrs.get(_LEAD_RUN)
    if not lead:
        return None
    try:
        return FitRun.attach(lead["run_id"], lead["tracking_uri"])
    except Exception as exc:  # noqa: BLE001 - the trials still count without their MLflow runs
        warnings.warn(f"trials are not tracked: the lead's MLflow run cannot be reached ({exc})", stacklevel=2)
        return None


def prepare_study(study: optuna.Study, config: FitConfig, *, trials: int | None = None,
                  objective: Objective | None = None, defaults: dict[str, Any] | None = None,
                  parent: FitRun | None = None, requeue_running: bool = False) -> int:
    """The lead's part before trials run: record the config (and the MLflow run to nest trials
    under) in the study for workers, and queue the trials still missing. A new study's trial 0 is
    ``defaults``, else ``objective.default_params(config)`` when the objective has one, else
    ``default_params(config)``. ``requeue_running``: the storage is this process's alone, so trials
    left running were killed with it: queue them again now. Returns how many trials were queued."""
    with _quiet():
        stored = config.model_copy(update={"tuning": config.tuning.model_copy(update={"storage": None})})
        study.set_user_attr(_CONFIG, stored.model_dump(mode="json"))
        if parent is not None:
            study.set_user_attr(_LEAD_RUN, {"run_id": parent.run_id, "tracking_uri": parent.tracking_uri})
        if requeue_running:
            _requeue_dead(study, config.tuning.max_retry)
        if defaults is None and not study.get_trials(deepcopy=False):
            defaults = getattr(objective, "default_params", default_params)(config)
        return queue_trials(study, requested_trials(config, trials), defaults)


def run_study(study: optuna.Study, objective: Objective, config: FitConfig, *, trials: int | None = None,
              timeout: float | None = None, parent: FitRun | None = None, worker: bool = False,
              requeue_running: bool = False, defaults: dict[str, Any] | None = None,
              trial_seconds: float | None = None, least_epochs: int | None = None) -> optuna.Study:
    """Run the study's queued trials through ``objective(trial, trial_config, on_epoch)``, which
    returns the trial's val accuracy (a fine-tuning objective passes ``on_epoch`` to ``fit_finetune``).

    The lead (``worker=False``) first runs ``prepare_study``, then runs queued trials until none is
    left, then waits for other processes' trials to end (queuing and running again any whose process
    died). A worker runs queued trials until none is left, nesting its MLflow runs under the lead's
    unless given ``parent``. ``timeout`` (seconds; default the recipe's) stops starting trials: those
    still queued wait for the next run; with ``trial_seconds`` (a trial's estimated cost), no trial
    starts that would not end within the timeout (the longest trial run here counts, once longer; with
    ``least_epochs``, a fine-tuning trial's shortest run: that many epochs at its pace)."""
    if worker:
        parent = parent or _lead_run(study)
    else:
        prepare_study(study, config, trials=trials, objective=objective, defaults=defaults, parent=parent,
                      requeue_running=requeue_running)
    timeout = timeout if timeout is not None else config.tuning.timeout
    deadline = None if timeout is None else time.monotonic() + timeout
    function = _trial_function(study, objective, config, parent)
    room = _TrialRoom(deadline, trial_seconds, least_epochs)
    total, finished = len(study.get_trials(deepcopy=False)), _count(study, *_FINISHED)
    with _quiet(), progress_bar(f"Tuning ({config.strategy}): trials", total, finished) as advance:
        while room.fits():
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                # gc after each trial frees a fine-tuning trial's GPU memory; it would cost more than a linear trial
                study.optimize(function, timeout=remaining, gc_after_trial=config.strategy != "linear",
                               callbacks=[lambda *_: advance(), room.after_trial])
                break  # the timeout: optimize never ends by itself otherwise
            except QueueEmpty:
                pass
            if worker or not _count(study, TrialState.RUNNING):
                break
            time.sleep(min(5, config.tuning.heartbeat_interval))  # other processes' trials still running
            optuna.storages.fail_stale_trials(study)  # a dead one is queued again, and run here
    return study


class _TrialRoom:
    """Whether another trial fits before ``deadline``: at least ``trial_seconds`` left (the shortest
    trial worth starting: a fine-tuning trial fits its epochs to the time it has), or, once a trial
    ran here, the longest one's pace over ``least_epochs`` epochs; as an Optuna callback, it stops the
    study when not."""

    def __init__(self, deadline: float | None, trial_seconds: float | None, least_epochs: int | None = None):
        self.deadline, self.cost, self.least_epochs = deadline, trial_seconds or 0.0, least_epochs

    def fits(self) -> bool:
        return self.deadline is None or self.deadline - time.monotonic() >= max(self.cost, 1e-3)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.datetime_start and trial.datetime_complete and trial.state == TrialState.COMPLETE:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
            epochs = len(trial.intermediate_values)
            if self.least_epochs and epochs > self.least_epochs:
                seconds *= self.least_epochs / epochs
            self.cost = max(self.cost, seconds)
        if not self.fits():
            study.stop()


@dataclass(frozen=True)
class Tuned:
    """What ``tune`` hands the lead: the config to fit the final model with, the study, what the
    report shows of it (``summary``), and the counts the lead decides by."""

    config: FitConfig  # the best trial's config; the recipe's own when tuning is off or nothing completed
    study: optuna.Study | None = None
    summary: dict = field(default_factory=dict)  # for the report and summary.json alone
    fit_dir: Path | None = None  # fine-tuning: the best trial's folder; fit_finetune there resumes its finished checkpoint
    trials: int = 0  # in the study
    pruned: int = 0
    waiting: int = 0  # queued, not started: the time left could not hold them
    did_not_learn: tuple[str, ...] = ()  # why, for each trial pruned because its run did not learn


def tune(config: FitConfig, output_dir: Path, objective: Objective, *, parent: FitRun | None = None,
         trials: int | None = None, timeout: float | None = None, storage: str | None = None,
         study_name: str | None = None, trial_seconds: float | None = None, least_epochs: int | None = None,
         data: str | None = None) -> Tuned:
    """Open (or continue) the fit's study of ``data`` (``DatasetSpec.identity``), run it, log it, and
    return the best config. ``trials``/``timeout``/``storage``/``study_name`` override the recipe's ``tuning`` values;
    ``trial_seconds``: the shortest trial's estimated cost, so none starts that the timeout would cut
    (``least_epochs``: the epochs of a fine-tuning trial's shortest run)."""
    if requested_trials(config, trials) == 0:
        return Tuned(config, summary={"trials": 0})

    url = storage_url(output_dir, storage or config.tuning.storage)
    connection = open_storage(url, config)
    try:
        study = open_study(config, output_dir, storage=connection, study_name=study_name, data=data)
        before = _count(study, *_FINISHED)  # trials an earlier run of this study finished: it continues
        run_study(study, objective, config, trials=trials, timeout=timeout, parent=parent, trial_seconds=trial_seconds,
                  least_epochs=least_epochs,
                  requeue_running=url.startswith("sqlite:"))  # SQLite is one process's (pitfall: "database is locked")
        summary = {**log_study(study, parent, output_dir, score_name(getattr(objective, "codes", None))),
                   "finished_before": before}
        best = best_config(study, config)
        held = study.get_trials(deepcopy=False)  # one read: a worker's trial ending meanwhile changes no count
        fine_tuned = config.strategy != "linear" and any(t.state == TrialState.COMPLETE for t in held)
        fit_dir = trial_dir(output_dir, study.best_trial) if fine_tuned else None
        failed = tuple(t.user_attrs.get(PRUNED_REASON, "") for t in held if t.user_attrs.get(DID_NOT_LEARN_ATTR))
        counts = (len(held), sum(t.state == TrialState.PRUNED for t in held), sum(t.state == TrialState.WAITING for t in held), failed)
    finally:
        close_storage(connection)  # before the study is read again: a reader reopens the file's WAL
    return Tuned(best, study, summary, fit_dir, *counts)
