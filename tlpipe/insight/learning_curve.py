"""Does more data pay? The linear classifier refitted on nested, stratified fractions of train (on the
cached codes: seconds), its val error fitted by a power law, ``error = a * n ** -b`` (the shape
learning curves take in their middle range, Hestness et al., 2017), and extrapolated to 2x and 4x
the images. The interval comes from resampling val (the curve's points are paired on the same
images) and the points' scatter about the law (which train images were drawn) widen it together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from tlpipe.training.linear import CV_MAX_IMAGES, fit_head

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
DRAWS = 3  # subsets per fraction below 1: their val correctness averaged
BOOTSTRAP = 500
MIN_IMAGES = 4  # a fraction keeps at least this many train images, and one per class


@dataclass(frozen=True)
class LearningCurve:
    """Val accuracy of the linear classifier at each train size, and what 2x and 4x would give."""

    sizes: list[int]
    accuracy: list[float]
    exponent: float  # b in error = a * n^-b: how fast the error falls with more images
    predicted: dict[str, dict[str, float]]  # "2x"/"4x": images, accuracy, low, high (95%)

    def sentence(self) -> str:
        """What doubling the images would likely give, in points of val accuracy."""
        now, double = self.accuracy[-1], self.predicted["2x"]
        gain, low, high = (100 * (double[k] - now) for k in ("accuracy", "low", "high"))
        return (f"doubling the train images ({self.sizes[-1]} -> {double['images']}) would likely give "
                f"{gain:+.1f} points of val accuracy ({low:+.1f} to {high:+.1f}), by the linear classifier's learning curve")

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "val_accuracy": self.accuracy, "exponent": self.exponent,
                "predicted": self.predicted, "sentence": self.sentence()}


def nested_subsets(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Row indices of ``y`` for each fraction, each subset inside the next: one random order per class,
    and a fraction takes the first part of every class's order (so each class is represented)."""
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    return [np.sort(np.concatenate([order[:max(1, round(f * len(order)))] for order in orders])) for f in fractions]


def _power_law(sizes: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """(log a, b) of ``error = a * n^-b`` by least squares in log-log, b at least 0 (more data never
    predicted to hurt); errors floored at half an image of val so a perfect point stays finite."""
    log_n, log_e = np.log(sizes), np.log(errors)
    slope, intercept = np.polyfit(log_n, log_e, 1)
    if slope > 0:
        return float(np.mean(log_e)), 0.0
    return float(intercept), float(-slope)


def _extrapolation(sizes: np.ndarray, correct: np.ndarray, seed: int) -> tuple[float, float, np.ndarray]:
    """The power law's (log a, b) on the curve's points, and ``BOOTSTRAP`` refits on val resampled
    (rows: (log a, b)); errors floored at half an image of val so a perfect point stays finite."""
    floor = 0.5 / correct.shape[1]
    fit = lambda rows: _power_law(sizes, np.maximum(1 - correct[:, rows].mean(axis=1), floor))  # noqa: E731
    rng = np.random.default_rng(seed)
    n = correct.shape[1]
    return (*fit(slice(None)), np.array([fit(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]))


def _spread_of_fit(sizes: np.ndarray, correct: np.ndarray, log_a: float, b: float) -> float:
    """The variance of the points about the fitted law (accuracy units, two parameters spent): the
    part of the uncertainty a val bootstrap cannot see, from which train images were drawn."""
    residuals = correct.mean(axis=1) - (1 - np.exp(log_a) * sizes ** -b)
    return float(np.sum(residuals ** 2) / max(1, len(sizes) - 2))


def learning_curve(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, kind: str, C: float,
                   seed: int = 0) -> LearningCurve | None:
    """The linear classifier ``kind`` at ``C`` on nested fractions of train (codes ``X``, labels
    ``y``), scored on val, and its power law extrapolated to 2x and 4x; None when train is too small
    for a curve (under ``MIN_IMAGES`` in the smallest fraction)."""
    if len(y) * FRACTIONS[0] < MIN_IMAGES or len(np.unique(y)) < 2 or len(y_val) < 2:
        return None
    draws = [nested_subsets(y, FRACTIONS, seed + draw) for draw in range(DRAWS)]  # every class in every subset
    correct = []  # per fraction: (val images,) mean correctness over the draws
    with threadpool_limits(1):
        for i, fraction in enumerate(FRACTIONS):
            # draws average out which images a small subset holds; past CV_MAX_IMAGES that matters
            # little, and each fit costs in proportion to its images
            subsets = [draws[0][i]] if fraction == 1.0 or len(draws[0][i]) > CV_MAX_IMAGES else [d[i] for d in draws]
            correct.append(np.mean([fit_head(kind, C, X[rows], y[rows], seed).predict(X_val) == y_val for rows in subsets],
                                   axis=0))
    sizes = np.array([len(draws[0][i]) for i in range(len(FRACTIONS))], dtype=float)
    correct = np.array(correct)
    log_a, b, spread = _extrapolation(sizes, correct, seed)
    predicted = {}
    for factor in (2, 4):
        n = sizes[-1] * factor
        estimate = 1 - np.exp(log_a) * n ** -b
        half_width = 1.96 * np.sqrt(np.var(1 - np.exp(spread[:, 0]) * n ** -spread[:, 1]) + _spread_of_fit(sizes, correct, log_a, b))
        predicted[f"{factor}x"] = {"images": int(n), "accuracy": round(float(estimate), 4),
                                   "low": round(float(max(0.0, estimate - half_width)), 4),
                                   "high": round(float(min(1.0, estimate + half_width)), 4)}
    return LearningCurve([int(s) for s in sizes], [round(float(v), 4) for v in correct.mean(axis=1)], round(b, 4), predicted)
