"""The objectives a study runs: linear trials on cached codes, and fine-tuning trials that each train
a fresh copy of the pretrained backbone."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from tlpipe.config import FitConfig
from tlpipe.training.linear import ShrunkScaler
from tlpipe.tuning.storage import trial_dir
from tlpipe.tuning.study import EpochReporter, _free_cuda


class LinearObjective:
    """Linear trials on cached codes: the trial's classifier with its C, fitted on standardized train
    codes and scored on val, in milliseconds.

    The codes are standardized once (``ShrunkScaler``, as in ``fit_linear``) and projected once onto the span of the train codes (an SVD):
    an L2-penalised linear model's weights lie in that span, so the fit is the same with
    min(n, d) features instead of d. Each fit runs on one BLAS thread: on small matrices more threads
    cost more than they give (30x slower on 2 busy cores)."""

    def __init__(self, codes: dict[str, tuple[np.ndarray, np.ndarray]], defaults: dict[str, Any] | None = None):
        from threadpoolctl import ThreadpoolController

        self.codes, self.defaults, self.threads = codes, defaults, ThreadpoolController()
        (X, self.y), (X_val, self.y_val) = codes["train"], codes["val"]
        with self.threads.limit(limits=1):
            scaler = ShrunkScaler().fit(X)  # as fit_linear standardises
            X, X_val = scaler.transform(X), scaler.transform(X_val)
            if X.shape[0] < X.shape[1]:
                _, s, vt = np.linalg.svd(X, full_matrices=False)
                basis = vt[s > s[0] * 1e-6].T if len(s) and s[0] > 0 else vt.T
                X, X_val = X @ basis, X_val @ basis
        self.X, self.X_val = X, X_val

    def default_params(self, config: FitConfig) -> dict[str, Any]:
        """Trial 0: the classifier and C that ``fit_linear`` (cross-validation over the recipe's
        grid, then the better on val) picks untuned; ``defaults`` when the caller already knows them."""
        from tlpipe.training.linear import LinearProbe

        if self.defaults:
            return dict(self.defaults)

        lin = config.linear
        with self.threads.limit(limits=1):
            probe = LinearProbe(tuple(lin.classifiers), tuple(lin.c_grid), lin.cv_folds, config.seed)
            probe.fit(*self.codes["train"], *self.codes["val"])
        return {"classifier": probe.chosen_, "C": probe.candidates_[probe.chosen_]["C"]}

    def __call__(self, trial: optuna.Trial, config: FitConfig, on_epoch: EpochReporter) -> float:
        from tlpipe.training.linear import _estimator

        kind, c = config.linear.classifiers[0], config.linear.c_grid[0]
        with self.threads.limit(limits=1):
            model = _estimator(kind, config.seed)[-1].set_params(C=c).fit(self.X, self.y)  # fit_linear's own settings
            return float((model.predict(self.X_val) == self.y_val).mean())


class FinetuneObjective:
    """Fine-tuning trials: each trains a fresh copy of the pretrained backbone with ``fit_finetune``
    in ``<output>/trials/<n>`` (its checkpoints, so trials never resume each other), reporting each
    epoch to the pruner. Its value is the best epoch's val accuracy. ``codes``: the pretrained
    backbone's train/val codes (the LP-FT probe), shared by every trial."""

    def __init__(self, backbone, spec, output_dir: Path, codes: dict):
        self.backbone, self.spec, self.output_dir, self.codes = backbone, spec, Path(output_dir), codes

    def __call__(self, trial: optuna.Trial, config: FitConfig, on_epoch: EpochReporter) -> float:
        from tlpipe.training.strategies import fit_finetune

        backbone = dataclasses.replace(self.backbone, model=copy.deepcopy(self.backbone.model),
                                       data_config=copy.deepcopy(self.backbone.data_config))
        try:
            trained = fit_finetune(backbone, self.spec, config, trial_dir(self.output_dir, trial), self.codes, on_epoch=on_epoch)
            return max(epoch["val_accuracy"] for epoch in trained.history)
        finally:
            del backbone
            _free_cuda()


def linear_objective(codes: dict[str, tuple[np.ndarray, np.ndarray]], defaults: dict[str, Any] | None = None) -> LinearObjective:
    return LinearObjective(codes, defaults)


def finetune_objective(backbone, spec, output_dir: Path, codes: dict) -> FinetuneObjective:
    return FinetuneObjective(backbone, spec, output_dir, codes)
