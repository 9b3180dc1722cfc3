"""The objectives a study runs: linear trials on cached codes, and fine-tuning trials that each train
a fresh copy of the pretrained backbone."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from tlpipe.config import FitConfig
from tlpipe.tuning.storage import DID_NOT_LEARN_ATTR, PRUNED_REASON, trial_dir
from tlpipe.tuning.study import EpochReporter, _free_cuda


class LinearObjective:
    """Linear trials on cached codes: the trial's classifier at its C, fitted and scored on val by
    the same code as ``fit_linear``'s final fit (``tlpipe.training.linear.fit_head``), so the best
    trial's accuracy is the saved model's, to the bit (on one BLAS thread, as ``fit_head`` runs)."""

    def __init__(self, codes: dict[str, tuple[np.ndarray, np.ndarray]], defaults: dict[str, Any] | None = None):
        self.codes, self.defaults = codes, defaults

    def default_params(self, config: FitConfig) -> dict[str, Any]:
        """Trial 0: the classifier and C that ``fit_linear`` (cross-validation over the recipe's
        grid, then the better on val) picks untuned; ``defaults`` when the caller already knows them."""
        from tlpipe.training.fits import fit_linear

        if self.defaults:
            return dict(self.defaults)
        return fit_linear(config, self.codes).linear_params()

    def __call__(self, trial: optuna.Trial, config: FitConfig, on_epoch: EpochReporter) -> float:
        from tlpipe.training.linear import fit_head, head_score
        from tlpipe.training.multilabel import fit_multilabel_head

        (X, y), (X_val, y_val) = self.codes["train"], self.codes["val"]
        C = config.linear.c_grid[0]
        head = fit_multilabel_head(C, X, y, config.seed) if y.ndim == 2 else fit_head(config.linear.classifiers[0], C, X, y, config.seed)
        return head_score(head, X_val, y_val)


class FinetuneObjective:
    """Fine-tuning trials: each trains a fresh copy of the pretrained backbone with ``fit_finetune``
    in ``<output>/trials/<n>`` (its checkpoints, so trials never resume each other), reporting each
    epoch to the pruner. Its value is the best epoch's val accuracy (on the whole val split). ``codes``: the pretrained
    backbone's train/val codes (the LP-FT probe), shared by every trial. ``deadline``
    (``time.monotonic()``): a trial that would overrun it stops at an epoch boundary, its best epoch
    kept; before it, each trial fits its epochs to the time it has (``trial_allowance``). A trial
    that did not learn is pruned, the reason in its ``pruned_reason``. ``kept``: the frozen-stage
    outputs the trials share (``FrozenOutputs``; None: the objective's own)."""

    def __init__(self, backbone, spec, output_dir: Path, codes: dict, deadline: float | None = None, kept=None):
        from tlpipe.training.frozen import FrozenOutputs

        self.backbone, self.spec, self.output_dir, self.codes = backbone, spec, Path(output_dir), codes
        self.deadline, self.kept = deadline, FrozenOutputs() if kept is None else kept

    def __call__(self, trial: optuna.Trial, config: FitConfig, on_epoch: EpochReporter) -> float:
        from tlpipe.cache import cache_root
        from tlpipe.training.fits import DidNotLearn, fit_finetune

        # every trial reads the one decoded-image cache of the study's folder, not one of its own
        config = config.model_copy(update={"cache_dir": str(cache_root(config.cache_dir, self.output_dir).resolve())})
        try:
            # the best epoch's, on the whole val split; the trained copy is dropped before the CUDA cache is emptied
            return fit_finetune(self.backbone, self.spec, config, trial_dir(self.output_dir, trial), self.codes,
                                on_epoch=on_epoch, deadline=self.deadline,
                                allowance=trial_allowance(trial.study, self.deadline, config.finetune.epochs),
                                kept=self.kept).val_accuracy
        except DidNotLearn as failed:
            trial.set_user_attr(PRUNED_REASON, str(failed))
            trial.set_user_attr(DID_NOT_LEARN_ATTR, True)
            raise optuna.TrialPruned(str(failed)) from None
        finally:
            _free_cuda()


def trial_allowance(study: optuna.Study | None, deadline: float | None, epochs: int):
    """A trial's time: to ``deadline``, less what the trials still queued after it need for their
    planned ``epochs`` at its pace (``EpochAllowance``); None without a deadline."""
    from tlpipe.strategy.plan import MIN_EPOCHS
    from tlpipe.training.checks import EpochAllowance

    if deadline is None:
        return None
    queued = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) if study is not None else 0
    return EpochAllowance(deadline, epochs, queued, least=min(MIN_EPOCHS, epochs))


def linear_objective(codes: dict[str, tuple[np.ndarray, np.ndarray]], defaults: dict[str, Any] | None = None) -> LinearObjective:
    return LinearObjective(codes, defaults)


def finetune_objective(backbone, spec, output_dir: Path, codes: dict, deadline: float | None = None,
                       kept=None) -> FinetuneObjective:
    return FinetuneObjective(backbone, spec, output_dir, codes, deadline, kept)
