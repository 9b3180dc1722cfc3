"""Strategy 1 for a multi-label set: a logistic regression per class (one-vs-rest) on the frozen,
shrunk-standardised codes, C chosen by cross-validated mean average precision, exported as one
multi-label ``LinearHead`` (a sigmoid per class; thresholds chosen later, on val, by calibration).

The classes share the codes and C, not their weights: each is its own binary problem, as in
``sklearn.multiclass.OneVsRestClassifier``, whose estimators cannot warm-start across the C path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from tlpipe.bundle.calibration import DEFAULT_THRESHOLD  # until calibration chooses each class's threshold on val
from tlpipe.training.head import LinearHead
from tlpipe.training.linear import ShrunkScaler, c_path, cv_note, cv_rows, head_score, mean_average_precision


class _OneVsRest:
    """A logistic regression per class on scaled codes, each warm-started from the last C's weights;
    a class that is all positive or all negative in these rows gets its share as a constant."""

    def __init__(self, n_classes: int, seed: int):
        self.models = [LogisticRegression(max_iter=3000, warm_start=True, random_state=seed) for _ in range(n_classes)]

    def fit(self, X: np.ndarray, Y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
        """(coef (classes, features), intercept (classes,)) at ``C``."""
        coef, intercept = np.zeros((Y.shape[1], X.shape[1])), np.zeros(Y.shape[1])
        for j, model in enumerate(self.models):
            if Y[:, j].min() == Y[:, j].max():
                share = np.clip(Y[:, j].mean(), 1e-3, 1 - 1e-3)
                intercept[j] = np.log(share / (1 - share))
                continue
            model.set_params(C=C).fit(X, Y[:, j])
            coef[j], intercept[j] = model.coef_[0], model.intercept_[0]
        return coef, intercept


def fit_multilabel_head(C: float, X: np.ndarray, Y: np.ndarray, seed: int = 0) -> LinearHead:
    """The one-vs-rest head at ``C`` on all of ``X``, the scaler folded into its weights."""
    with threadpool_limits(1):
        scaler = ShrunkScaler().fit(X)
        coef, intercept = _OneVsRest(Y.shape[1], seed).fit(scaler.transform(X), Y, C)
    coef = coef / scaler.scale_
    return LinearHead(np.ascontiguousarray(coef, np.float32), np.ascontiguousarray(intercept - coef @ scaler.mean_, np.float32),
                      "logreg", np.ones(Y.shape[1]), np.full(Y.shape[1], DEFAULT_THRESHOLD))


def multilabel_folds(Y: np.ndarray, folds: int, seed: int):
    """Iterative stratification (``iterative-stratification``): every class in every fold, where its images allow."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    return MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(Y)), Y)


@dataclass
class MultilabelProbe:
    """``LinearProbe``'s contract for a 0/1 label matrix: ``fit(codes, Y, val_codes, Y_val)`` sets
    ``head_``, ``C_`` and ``val_score_`` (val mean average precision)."""

    c_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    cv_folds: int = 5
    seed: int = 0
    candidates_: dict = field(default_factory=dict, init=False)

    def fit(self, X: np.ndarray, Y: np.ndarray, X_val: np.ndarray, Y_val: np.ndarray) -> "MultilabelProbe":
        """C by cross-validated mean average precision along ``c_path`` (from the smallest C up, on
        ``cv_rows``); folds adapt to the rarest class (at most ``cv_folds``, at least 2), else C is
        chosen on validation (``cv_note_`` says so)."""
        rows = cv_rows(Y, self.seed)
        rarest = int(Y[rows].sum(axis=0).min())
        folds = min(self.cv_folds, rarest)
        self.cv_note_ = cv_note(rows, Y, folds) if folds >= 2 else (
            f"a class has {rarest} train image: no cross-validation, C chosen on validation ({len(Y_val)} images)")
        splits = [(rows[train], rows[test]) for train, test in multilabel_folds(Y[rows], folds, self.seed)] \
            if folds >= 2 else [(np.arange(len(Y)), None)]
        with threadpool_limits(1):
            scores = self._path(X, Y, X_val, Y_val, splits)
        best = int(np.argmax(scores))
        self.C_ = float(self.c_grid[best])
        self.head_ = fit_multilabel_head(self.C_, X, Y, self.seed)
        self.val_score_ = head_score(self.head_, X_val, Y_val)
        self.chosen_ = "logreg"
        self.candidates_ = {"logreg": {"C": self.C_, "cv_map": float(scores[best]), "val_map": self.val_score_}}
        return self

    def _path(self, X, Y, X_val, Y_val, splits) -> np.ndarray:
        """Mean average precision at each C of the grid (-inf past where the path stopped), over the
        folds' held-out rows, or on validation when ``splits`` holds no held-out rows."""
        fitted = []
        for train, test in splits:
            scaler = ShrunkScaler().fit(X[train])
            held_X, held_Y = (X[test], Y[test]) if test is not None else (X_val, Y_val)
            fitted.append((_OneVsRest(Y.shape[1], self.seed), scaler.transform(X[train]), Y[train],
                           scaler.transform(held_X), held_Y))

        def score(C: float) -> float:
            fold_scores = []
            for model, train_X, train_Y, held_X, held_Y in fitted:
                coef, intercept = model.fit(train_X, train_Y, C)
                fold_scores.append(mean_average_precision(held_Y, held_X @ coef.T + intercept))
            return float(np.mean(fold_scores))

        return c_path(self.c_grid, score)

    def summary(self) -> dict:
        return self.candidates_
