"""Strategy 1: a linear classifier on frozen CNN codes (softmax regression or a linear SVM).

Both are fitted by scikit-learn on standardized codes with C chosen by stratified
cross-validation on train; the one better on validation is kept. Either is then exported as a
single ``LinearHead`` (standardization folded into the weights) that runs in torch at predict
time, so the bundle needs no pickle and prediction is one matrix product.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

CLASSIFIERS = ("logreg", "svm")
_STEP = {"logreg": "logisticregression", "svm": "linearsvc"}  # make_pipeline's step names
PROBABILITY_NOTES = {
    "logreg": "softmax of the logistic-regression scores (the model's own probabilities)",
    "svm": "softmax of the SVM decision values, with one temperature fitted on out-of-fold train decisions",
    "finetune": "softmax of the fine-tuned network's own logits",
}


@dataclass
class LinearHead:
    """``probabilities = softmax(temperature_scale * (codes @ weight.T + bias))``."""

    weight: np.ndarray  # (n_classes, n_features), float32
    bias: np.ndarray  # (n_classes,)
    kind: str
    scale: float = 1.0

    def logits(self, codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = torch.from_numpy(np.ascontiguousarray(codes, np.float32)) @ torch.from_numpy(self.weight).T
            return (out + torch.from_numpy(self.bias)).numpy()

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.logits(codes)) * self.scale, dim=1).numpy()

    def predict(self, codes: np.ndarray) -> np.ndarray:
        return self.logits(codes).argmax(axis=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": torch.from_numpy(self.weight),
            "bias": torch.from_numpy(self.bias),
            "scale": torch.tensor([self.scale], dtype=torch.float32),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kind: str) -> "LinearHead":
        return cls(tensors["weight"].numpy(), tensors["bias"].numpy(), kind, float(tensors["scale"][0]))


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


def linear_estimator(kind: str, C: float, seed: int = 0) -> Pipeline:
    """Classifier ``kind`` (logreg, svm) at ``C`` on shrunk-standardised codes: the one factory behind
    ``LinearProbe``'s cross-validation and final fit and every linear tuning trial, so a trial's
    val accuracy is the final fit's, to the bit."""
    if kind == "logreg":
        clf = LogisticRegression(C=C, max_iter=3000, random_state=seed)
    else:
        # The dual solver: several times faster than the primal on codes (n_features ~ n_samples).
        clf = LinearSVC(C=C, dual=True, max_iter=5000, random_state=seed)
    return make_pipeline(ShrunkScaler(), clf)


def export_head(pipeline: Pipeline, kind: str) -> LinearHead:
    """A fitted ``linear_estimator`` as a ``LinearHead``, the scaler folded into the weights:
    W((x - mu) / sigma) + b = (W / sigma) x + (b - W mu / sigma)."""
    scaler, clf = pipeline[0], pipeline[-1]
    coef, intercept = clf.coef_ / scaler.scale_, clf.intercept_ - (clf.coef_ / scaler.scale_) @ scaler.mean_
    if len(coef) == 1:  # two classes, one score d for class 1: logits (-d/2, d/2) give softmax == sigmoid(d)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    # liblinear leaves coef_ in Fortran order; safetensors stores C-contiguous tensors only
    return LinearHead(np.ascontiguousarray(coef, np.float32), np.ascontiguousarray(intercept, np.float32), kind)


def fit_head(kind: str, C: float, X: np.ndarray, y: np.ndarray, seed: int = 0) -> LinearHead:
    """``linear_estimator(kind, C)`` fitted on the codes ``X``, labels ``y``, as a ``LinearHead``."""
    return export_head(linear_estimator(kind, C, seed).fit(X, y), kind)


def accuracy(head: LinearHead, X: np.ndarray, y: np.ndarray) -> float:
    return float((head.predict(X) == y).mean())


def _fit_temperature(decisions: np.ndarray, y: np.ndarray) -> float:
    if decisions.ndim == 1:
        decisions = np.stack([-decisions / 2, decisions / 2], axis=1)
    nll = lambda log_s: -log_softmax(decisions * np.exp(log_s), axis=1)[np.arange(len(y)), y].mean()  # noqa: E731
    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))


@dataclass
class LinearProbe:
    """scikit-learn-style estimator: ``fit(codes, labels, val_codes, val_labels)`` sets ``head_``."""

    classifiers: tuple[str, ...] = CLASSIFIERS
    c_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
    cv_folds: int = 5
    seed: int = 0
    # One process: joblib's worker processes take seconds to start in a fresh `tlpipe fit`, more than
    # they save on codes of a few thousand images (three taps, hymenoptera: 11.2 s with n_jobs=-1,
    # 4.0 s with None; BLAS still uses every core inside each fit).
    n_jobs: int | None = None
    candidates_: dict = field(default_factory=dict, init=False)

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray) -> "LinearProbe":
        folds = max(2, min(self.cv_folds, int(np.bincount(y).min())))
        cv = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
        self.candidates_ = {}
        for kind in self.classifiers:
            search = GridSearchCV(linear_estimator(kind, self.c_grid[0], self.seed), {f"{_STEP[kind]}__C": list(self.c_grid)},
                                  cv=cv, n_jobs=self.n_jobs, refit=False).fit(X, y)
            C = float(search.best_params_[f"{_STEP[kind]}__C"])
            head = fit_head(kind, C, X, y, self.seed)
            if kind == "svm":
                decisions = cross_val_predict(linear_estimator(kind, C, self.seed), X, y, cv=cv, method="decision_function")
                head.scale = _fit_temperature(decisions, y)
            self.candidates_[kind] = {"C": C, "cv_accuracy": float(search.best_score_),
                                      "val_accuracy": accuracy(head, X_val, y_val), "head": head}
        # Better on validation wins; on a tie the one with native probabilities (logreg, listed first).
        self.chosen_ = max(self.candidates_, key=lambda k: self.candidates_[k]["val_accuracy"])
        self.head_ = self.candidates_[self.chosen_]["head"]
        return self

    def summary(self) -> dict:
        """Per classifier: chosen C, CV and validation accuracy (no arrays)."""
        return {k: {m: v for m, v in c.items() if m != "head"} for k, c in self.candidates_.items()}
