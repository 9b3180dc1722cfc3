"""The search space: the params a trial draws, the recipe's own configuration as trial 0, and the
config a trial's params stand for."""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from tlpipe.config import FitConfig
from tlpipe.errors import TlpipeError

DEFAULT_TRIALS = {"linear": 30, "partial": 8, "full": 8}  # when neither the recipe nor the caller says


def requested_trials(config: FitConfig, trials: int | None = None) -> int:
    """The caller's count, else the recipe's ``tuning.trials``, else the strategy's default."""
    if config.strategy not in DEFAULT_TRIALS:
        raise TlpipeError(f"tuning needs the strategy chosen first (linear, partial or full), not '{config.strategy}'")
    if trials is not None:
        return trials
    return config.tuning.trials if config.tuning.trials is not None else DEFAULT_TRIALS[config.strategy]


def _widen(bounds, value) -> tuple:
    return min(bounds[0], value), max(bounds[1], value)


def _linear_space(config: FitConfig) -> tuple[list[str], tuple[float, float]]:
    """Classifier choices and C range, widened to hold every classifier and C of the recipe's grid
    (trial 0 is one of them)."""
    tuning, lin = config.tuning, config.linear
    choices = list(dict.fromkeys([*(tuning.classifiers or []), *lin.classifiers]))
    low, high = tuning.c_range or (min(lin.c_grid), max(lin.c_grid))
    return choices, (min(low, *lin.c_grid), max(high, *lin.c_grid))


def default_params(config: FitConfig) -> dict[str, Any]:
    """The recipe's own configuration as trial params. Linear: the first classifier at the grid's
    middle C (``LinearObjective.default_params`` gives the exact untuned choice from the codes)."""
    if config.strategy == "linear":
        grid = sorted(config.linear.c_grid)
        return {"classifier": config.linear.classifiers[0], "C": float(grid[len(grid) // 2])}
    ft = config.finetune
    params = {"lr": ft.lr, "backbone_lr_mult": ft.backbone_lr_mult, "weight_decay": ft.weight_decay}
    if config.strategy == "partial":
        params["unfreeze_stages"] = ft.unfreeze_stages
    return params


def suggest_config(trial: optuna.Trial, config: FitConfig) -> FitConfig:
    """Draw the trial's params from the search space; return the config they stand for."""
    if config.strategy == "linear":
        choices, (low, high) = _linear_space(config)
        trial.suggest_categorical("classifier", choices)
        trial.suggest_float("C", low, high, log=True)
    else:
        tuning, ft = config.tuning, config.finetune
        trial.suggest_float("lr", *_widen(tuning.lr_range, ft.lr), log=True)
        trial.suggest_float("backbone_lr_mult", *_widen(tuning.backbone_lr_mult_range, ft.backbone_lr_mult), log=True)
        trial.suggest_float("weight_decay", *_widen(tuning.weight_decay_range, ft.weight_decay))
        if config.strategy == "partial":
            trial.suggest_int("unfreeze_stages", *_widen(tuning.unfreeze_stages_range, ft.unfreeze_stages))
    return params_config(config, trial.params)


def params_config(config: FitConfig, params: dict[str, Any]) -> FitConfig:
    """A copy of ``config`` with a trial's params in place. Linear: that one classifier and C, so
    ``fit_linear`` fits exactly the trial's model."""
    if config.strategy == "linear":
        linear = config.linear.model_copy(update={"classifiers": [params["classifier"]], "c_grid": [float(params["C"])]})
        return config.model_copy(update={"linear": linear})
    names = ("lr", "backbone_lr_mult", "weight_decay", "unfreeze_stages")
    finetune = config.finetune.model_copy(update={k: params[k] for k in names if k in params})
    return config.model_copy(update={"finetune": finetune})


def best_config(study: optuna.Study, config: FitConfig) -> FitConfig:
    """The best complete trial's config; ``config`` itself when no trial completed."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return config
    return params_config(config, study.best_trial.params)
