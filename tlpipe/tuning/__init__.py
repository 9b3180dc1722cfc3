"""Hyperparameter search with Optuna: every fit runs a study, and the final model is its best trial.

Search space (``config.tuning``): fine-tuning (partial, full) tunes the head learning rate (log
scale), the backbone LR multiplier (log) and weight decay, and for partial the number of unfrozen
stages; linear tunes the classifier (logreg, svm) and C (log). Trial 0 is the recipe's own
configuration, so tuning never ends worse than no tuning. TPE sampler, seeded. Fine-tuning trials
report val accuracy each epoch and the recipe's pruner (median, hyperband) stops the poor ones; a
CUDA out-of-memory prunes its trial, with the reason in the trial's ``pruned_reason``. ``trials=0``
turns tuning off.

Storage: ``sqlite:///<output>/optuna.db`` unless ``tuning.storage`` names an Optuna RDB URL
(``postgresql://...``) shared by several processes or machines. The lead process queues the trials
the study still lacks (requested - finished); every process, the lead and any workers
(``join_study`` then ``run_study(worker=True)``), runs queued trials only, so the study ends with
exactly the requested count however many processes share it. Re-running a killed fit continues its
study; a worker that dies mid-trial is caught by the heartbeat and its trial queued again.

Tracking: each trial is a nested MLflow run under the fit's run (params, per-epoch metrics, state);
``log_study`` puts the best params and the optimization history and parameter-importance plots on
the fit's run.

The lead, in a few lines::

    objective = (linear_objective(codes) if config.strategy == "linear"
                 else finetune_objective(backbone, spec, out, codes))
    tuned = tune(config, out, objective, parent=run, data=spec.identity)  # the study of this data
    config = tuned.config  # the best trial's; fine-tuning: fit_finetune(..., tuned.fit_dir or out, ...)
                           # resumes that trial's finished checkpoint instead of training again

A worker process on the same study::

    study, config = join_study(url, name)
    run_study(study, linear_objective(codes), config, worker=True)

Layout, each module importing only those before it in this list: ``space`` (the search space,
trial 0, the config a trial's params stand for), ``storage`` (where the study lives, the queue that
holds it to its count, creating or joining it, the names of what tlpipe records on it), ``results``
(summary, plots, logging on the fit's run), ``study`` (queuing and running trials, their nested MLflow
runs, ``tune``) and ``objectives`` (linear and fine-tuning trials). This package re-exports them all.
"""
from tlpipe.tuning.objectives import (
    FinetuneObjective, LinearObjective, finetune_objective, linear_objective, trial_allowance,
)
from tlpipe.tuning.results import log_study, study_summary
from tlpipe.tuning.space import (
    DEFAULT_TRIALS, best_config, default_params, params_config, requested_trials, suggest_config,
)
from tlpipe.tuning.storage import (
    PRUNED_REASON, STUDY_DB, WORKER_ATTR, QueueEmpty, default_study_name, join_study, make_pruner, open_study,
    storage_url, trial_dir,
)
from tlpipe.tuning.study import (
    STATE_TAG, EpochReporter, Objective, Tuned, prepare_study, queue_trials, run_study, tune,
)

__all__ = [
    "DEFAULT_TRIALS", "PRUNED_REASON", "STATE_TAG", "STUDY_DB", "WORKER_ATTR", "QueueEmpty",
    "EpochReporter", "FinetuneObjective", "LinearObjective", "Objective", "Tuned",
    "best_config", "default_params", "default_study_name", "finetune_objective", "join_study",
    "linear_objective", "log_study", "make_pruner", "open_study", "params_config", "prepare_study",
    "queue_trials", "requested_trials", "run_study", "storage_url", "study_summary", "suggest_config",
    "trial_allowance", "trial_dir", "tune",
]
