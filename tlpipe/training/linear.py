"""Strategy 1: a linear classifier on frozen CNN codes (softmax regression or a linear SVM).

Both are fitted by scikit-learn on standardized codes with C chosen by stratified
cross-validation on train; the one better on validation is kept. Either is then exported as a
single ``LinearHead`` (standardization folded into the weights) that runs in torch at predict
time, so the bundle needs no pickle and prediction is one matrix product. A multi-label set gets
one-vs-rest logistic regression (``MultilabelProbe``), scored by mean average precision.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from joblib import Parallel, delayed
from scipy.linalg import eigh
from scipy.optimize import minimize
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_array, check_X_y
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from threadpoolctl import threadpool_limits

from tlpipe.bundle.calibration import fit_scale
from tlpipe.data.dataset import stratified_subset
from tlpipe.training.head import CLASSIFIERS, LinearHead

# C is chosen by cross-validation on at most this many train images (stratified), the classifier
# then fitted on all: every fold fit costs time in proportion to the images, and the chosen C moves
# little past a few thousand (measured in bench/SCALE.md).
CV_MAX_IMAGES = 4000

class ShrunkScaler(StandardScaler):
    """Standardisation whose per-feature variances are shrunk toward their mean, by ``prior``
    pseudo-samples: ``var_i' = (n var_i + prior mean(var)) / (n + prior)``. With a few images per
    class, plain standardisation divides by variances estimated from a handful of codes and blows
    up features that happened not to vary: on hymenoptera at 5 images a class it gave 0.68 val
    accuracy whatever C, this 0.895; at 20 a class 0.928 -> 0.941; all 245 images 0.948 -> 0.961
    (logistic regression, C by CV, 224 px). With many images it is plain standardisation."""

    def __init__(self, prior: float = 50.0):
        super().__init__()
        self.prior = prior

    def fit(self, X, y=None, sample_weight=None) -> "ShrunkScaler":
        super().fit(X, y, sample_weight)
        n = len(X)
        self.scale_ = np.sqrt((n * self.var_ + self.prior * self.var_.mean()) / (n + self.prior))
        self.scale_[self.scale_ == 0] = 1.0
        return self


class SquaredHingeSVC(ClassifierMixin, BaseEstimator):
    """The linear SVM of ``sklearn.svm.LinearSVC`` (one-vs-rest, squared hinge, the intercept as a
    regularized feature: ``1/2 ||w||^2 + C sum max(0, 1 - y w.x)^2``), solved by L-BFGS in the
    eigenbasis of the codes' Gram matrix, each direction scaled by ``1 / sqrt(1 + 2 C s)`` (``s`` its
    eigenvalue): the Hessian where every margin is active becomes the identity. The basis and the
    products with it are float32 (the codes' own precision; the solver's sums are float64): they are
    the cost of every iteration. With ``warm_start``, a refit on the same array reuses the basis and
    starts from the last C's solution. The CV path on digits codes (1437 x 1280, 10 classes, 5
    folds, the default C grid) took 3.9 s against the softmax's 10.0 s in the same run (liblinear:
    30.3 s, in another), with the same CV accuracy at every C and 99.99% of liblinear's predictions."""

    def __init__(self, C: float = 1.0, tol: float = 1e-4, max_iter: int = 2000, warm_start: bool = False):
        self.C, self.tol, self.max_iter, self.warm_start = C, tol, max_iter, warm_start

    def fit(self, X, y) -> "SquaredHingeSVC":
        given, (X, y) = X, check_X_y(X, y, dtype=[np.float64, np.float32])  # float32 kept: the basis is float32
        self.classes_, self.n_features_in_ = np.unique(y), X.shape[1]
        signs = np.where(y[:, None] == self.classes_[None], 1.0, -1.0)
        signs = (signs[:, 1:] if len(self.classes_) == 2 else signs).astype(np.float32)  # two classes: one score
        if not (self.warm_start and getattr(self, "_basis_of", None) is given):  # the same array as last fit
            self._basis, self._basis_of, self._solution = _gram_basis(X), given, None
        rows, eigenvalues, V = self._basis
        scale = 1 / np.sqrt(1 + 2 * self.C * eigenvalues)[:, None]
        start = np.zeros((rows.shape[1], signs.shape[1])) if self._solution is None else self._solution / scale

        def objective(b: np.ndarray) -> tuple[float, np.ndarray]:
            A = scale * b.reshape(start.shape)
            margins = np.maximum(0, 1 - signs * (rows @ A.astype(rows.dtype)))
            gradient = A - 2 * self.C * (rows.T @ (signs * margins))
            margins = margins.astype(np.float64)
            return 0.5 * (A * A).sum() + self.C * (margins * margins).sum(), (scale * gradient).ravel()

        found = minimize(objective, start.ravel(), jac=True, method="L-BFGS-B",
                         options={"maxiter": self.max_iter, "gtol": self.tol, "ftol": 1e-12})
        self._solution = scale * found.x.reshape(start.shape)
        self.n_iter_ = found.nit
        weights = V @ self._solution  # (features + 1, scores)
        self.coef_, self.intercept_ = np.ascontiguousarray(weights[:-1].T), weights[-1].copy()
        return self

    def decision_function(self, X) -> np.ndarray:
        """One score per class (two classes: one, for the second), as ``LinearSVC`` gives them."""
        scores = check_array(X) @ self.coef_.T + self.intercept_
        return scores.ravel() if len(self.classes_) == 2 else scores

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)]


def _gram_basis(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``Xa = [X, 1]``: ``rows = Xa V`` with orthogonal columns, their squared norms, and ``V``
    (orthonormal columns spanning Xa's rows: the solution lies there), from the eigendecomposition
    of the smaller Gram matrix (features or samples), in float32; directions whose eigenvalue is
    float32's rounding of the largest are left out."""
    Xa = np.hstack([X, np.ones((len(X), 1), X.dtype)]).astype(np.float32, copy=False)
    if len(Xa) >= Xa.shape[1]:
        eigenvalues, V = eigh(Xa.T @ Xa, driver="evd")
        return Xa @ V, np.maximum(eigenvalues, 0).astype(np.float64), V
    eigenvalues, U = eigh(Xa @ Xa.T, driver="evd")
    keep = eigenvalues > eigenvalues.max() * 1e-6
    singular = np.sqrt(eigenvalues[keep])
    return U[:, keep] * singular, eigenvalues[keep].astype(np.float64), Xa.T @ (U[:, keep] / singular)


def linear_estimator(kind: str, C: float, seed: int = 0) -> Pipeline:
    """Classifier ``kind`` (logreg, svm) at ``C`` on shrunk-standardised codes: the one factory behind
    ``LinearProbe``'s cross-validation and final fit and every linear tuning trial, so a trial's
    val accuracy is the final fit's, to the bit."""
    if kind == "logreg":
        clf = LogisticRegression(C=C, max_iter=3000, random_state=seed)
    else:
        clf = SquaredHingeSVC(C=C)
    return make_pipeline(ShrunkScaler(), clf)


def export_head(pipeline: Pipeline, kind: str) -> LinearHead:
    """A fitted ``linear_estimator`` as a ``LinearHead``, the scaler folded into the weights:
    W((x - mu) / sigma) + b = (W / sigma) x + (b - W mu / sigma)."""
    scaler, clf = pipeline[0], pipeline[-1]
    coef, intercept = clf.coef_ / scaler.scale_, clf.intercept_ - (clf.coef_ / scaler.scale_) @ scaler.mean_
    if len(coef) == 1:  # two classes, one score d for class 1: logits (-d/2, d/2) give softmax == sigmoid(d)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    # safetensors stores C-contiguous tensors only
    return LinearHead(np.ascontiguousarray(coef, np.float32), np.ascontiguousarray(intercept, np.float32), kind)


def fit_head(kind: str, C: float, X: np.ndarray, y: np.ndarray, seed: int = 0) -> LinearHead:
    """``linear_estimator(kind, C)`` fitted on the codes ``X``, labels ``y``, as a ``LinearHead``
    (BLAS on one thread, as in ``LinearProbe.fit``: so is every tuning trial's fit)."""
    with threadpool_limits(1):
        return export_head(linear_estimator(kind, C, seed).fit(X, y), kind)


def accuracy(head: LinearHead, X: np.ndarray, y: np.ndarray) -> float:
    return float((head.predict(X) == y).mean())


def mean_average_precision(Y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision per class, averaged over the classes with a positive among ``Y``'s rows
    (one without any has no precision to speak of)."""
    present = Y.sum(axis=0) > 0
    if not present.any():
        return 0.0
    return float(average_precision_score(Y[:, present], scores[:, present], average="macro"))


def head_score(head: LinearHead, X: np.ndarray, y: np.ndarray) -> float:
    """What a fit ranks heads by on (``X``, ``y``): accuracy, or for a multi-label head the mean
    average precision of its scores (thresholds play no part: they are chosen after)."""
    return mean_average_precision(y, head.logits(X)) if head.multilabel else accuracy(head, X, y)


def cv_rows(y: np.ndarray, seed: int, least: int = 1) -> np.ndarray:
    """The rows cross-validation runs on: all of ``y``'s, or a stratified ``CV_MAX_IMAGES`` of them
    with each class's first ``least`` (enough for every fold to hold one out)."""
    return stratified_subset(y, CV_MAX_IMAGES, seed, least)


def cv_note(rows: np.ndarray, y: np.ndarray, folds: int) -> str | None:
    """What the report says when C was chosen on a part of train."""
    if len(rows) == len(y):
        return None
    return (f"C chosen by {folds}-fold cross-validation on a stratified {len(rows):,} of the {len(y):,} train images "
            "(the cost of every fold grows with the images); the classifier fitted on all of them")


PATH_PATIENCE = 2  # C values in a row below the best mean accuracy before the path stops


class _Fold:
    """One fold of ``cv_path``: its scaled codes, and one classifier kept across C values, each
    warm-started from the previous C's weights (the SVM also keeps its basis)."""

    def __init__(self, kind: str, X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, seed: int):
        scaler = ShrunkScaler().fit(X[train])
        self.X_train, self.y_train = scaler.transform(X[train]), y[train]
        self.X_test, self.y_test, self.test, self.kind = scaler.transform(X[test]), y[test], test, kind
        self.clf = clone(linear_estimator(kind, 1.0, seed)[-1]).set_params(warm_start=True)

    def score(self, C: float) -> tuple[float, np.ndarray | None]:
        """Test accuracy at ``C``, and the SVM's decision values on the test rows (None for the softmax)."""
        self.clf.set_params(C=C).fit(self.X_train, self.y_train)
        decisions = self.clf.decision_function(self.X_test) if self.kind == "svm" else None
        return self.clf.score(self.X_test, self.y_test), decisions


def cv_path(kind: str, X: np.ndarray, y: np.ndarray, cv: StratifiedKFold, c_grid: tuple[float, ...],
            seed: int = 0, n_jobs: int | None = None) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    """Mean fold accuracy of ``linear_estimator(kind, C)`` at each C of ``c_grid`` (in its order, the
    figure GridSearchCV reports; -inf where the path stopped before it), and each C's out-of-fold SVM
    decision values (for the temperature). Per fold the scaler is fitted once; C runs upwards, the
    softmax warm-started from the previous C (on digits codes, 1437 x 1280, quick grid, 3 folds:
    1.1 s against 1.7 s cold, accuracies equal within the solver's ``tol``), and the path stops once
    ``PATH_PATIENCE`` C values in a row score below the best: past the optimum, where the larger C
    values, the slowest fits of either solver, no longer win."""
    folds = [_Fold(kind, X, y, train, test, seed) for train, test in cv.split(X, y)]
    decisions = {}

    def score(C: float) -> float:
        results = Parallel(n_jobs=n_jobs)(delayed(fold.score)(C) for fold in folds)
        if kind == "svm":
            decisions[C] = np.zeros((len(y), *results[0][1].shape[1:]))
            for fold, (_, fold_decisions) in zip(folds, results):
                decisions[C][fold.test] = fold_decisions
        return float(np.mean([fold_score for fold_score, _ in results]))

    return c_path(c_grid, score), decisions


def c_path(c_grid: tuple[float, ...], score: Callable[[float], float]) -> np.ndarray:
    """``score(C)`` at each C of ``c_grid`` (in its order; -inf where the path stopped before it),
    C run upwards until ``PATH_PATIENCE`` values in a row score below the best."""
    by_c, stale = {}, 0
    for C in sorted(set(c_grid)):
        by_c[C] = score(C)
        stale = stale + 1 if by_c[C] < max(by_c.values()) else 0
        if stale >= PATH_PATIENCE:
            break
    return np.array([by_c.get(C, -np.inf) for C in c_grid])


@dataclass
class LinearProbe:
    """scikit-learn-style estimator: ``fit(codes, labels, val_codes, val_labels)`` sets ``head_``."""

    classifiers: tuple[str, ...] = CLASSIFIERS
    c_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    cv_folds: int = 5
    seed: int = 0
    # One process: joblib's worker processes take seconds to start in a fresh `tlpipe fit`, more than
    # they save on codes of a few thousand images (three taps, hymenoptera: 11.2 s with n_jobs=-1,
    # 4.0 s with None).
    n_jobs: int | None = None
    candidates_: dict = field(default_factory=dict, init=False)

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> "LinearProbe":
        """C by ``cv_path`` per classifier (on ``cv_rows``), then each fitted on all of train at its
        C. The folds adapt to the smallest class (at most ``cv_folds``, at least 2); a class with a single train
        image leaves no cross-validation: C is then chosen on validation (``cv_note_`` says so).
        BLAS on one thread: on these small matrices two threads on a busy 2-core machine made each
        L-BFGS fit up to 50x slower (digits codes, 1437 x 1280: 14 s against 0.26 s)."""
        rows = cv_rows(y, self.seed, least=self.cv_folds)
        smallest = int(np.bincount(y[rows])[np.unique(y)].min())
        folds = min(self.cv_folds, smallest)
        self.cv_note_ = cv_note(rows, y, folds) if folds >= 2 else (
            f"a class has {smallest} train image: no cross-validation, C chosen on validation ({len(y_val)} images)")
        self.candidates_ = {}
        with threadpool_limits(1):
            for kind in self.classifiers:
                if folds >= 2:
                    cv = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
                    (scores, decisions), heads = cv_path(kind, X[rows], y[rows], cv, self.c_grid, self.seed, self.n_jobs), {}
                else:
                    scores, decisions, heads = self._val_path(kind, X, y, X_val, y_val)
                best = int(np.argmax(scores))  # the first of equal scores, as GridSearchCV ranks them
                C = float(self.c_grid[best])
                head = heads.get(C) or fit_head(kind, C, X, y, self.seed)
                if kind == "svm":
                    head.scale = fit_scale(decisions[C], y[rows] if folds >= 2 else y_val)
                self.candidates_[kind] = {"C": C, "cv_accuracy": float(scores[best]),
                                          "val_accuracy": accuracy(head, X_val, y_val), "head": head}
        # Better on validation wins; on a tie the one with native probabilities (logreg, listed first).
        self.chosen_ = max(self.candidates_, key=lambda k: self.candidates_[k]["val_accuracy"])
        self.head_ = self.candidates_[self.chosen_]["head"]
        self.C_, self.val_score_ = self.candidates_[self.chosen_]["C"], self.candidates_[self.chosen_]["val_accuracy"]
        return self

    def _val_path(self, kind: str, X, y, X_val, y_val) -> tuple[np.ndarray, dict[float, np.ndarray], dict[float, LinearHead]]:
        """``cv_path``'s figures with validation in place of the folds: val accuracy at each C, the
        SVM's val decision values (for the temperature), and the heads, fitted on all of train."""
        heads = {C: fit_head(kind, C, X, y, self.seed) for C in self.c_grid}
        return (np.array([accuracy(heads[C], X_val, y_val) for C in self.c_grid]),
                {C: head.logits(X_val) for C, head in heads.items()} if kind == "svm" else {}, heads)

    def summary(self) -> dict:
        """Per classifier: chosen C, CV and validation accuracy (no arrays)."""
        return {k: {m: v for m, v in c.items() if m != "head"} for k, c in self.candidates_.items()}
