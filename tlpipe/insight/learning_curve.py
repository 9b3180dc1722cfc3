"""Does more data pay? The linear classifier refitted on nested, stratified fractions of train (on the
cached codes: seconds), its val error (1 - accuracy; multi-label: 1 - mAP) fitted by a power law,
``error = a * n ** -b`` (the shape learning curves take in their middle range, Hestness et al.,
2017), and extrapolated to 2x and 4x the images. The interval comes from resampling val (the
curve's points are paired on the same images) and the points' scatter about the law (which train
images were drawn) widen it together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from tlpipe.data.dataset import stratified_subset
from tlpipe.training.linear import CV_MAX_IMAGES, fit_head, mean_average_precision

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
DRAWS = 3  # subsets per fraction below 1: their val scores averaged
BOOTSTRAP = 500
MIN_IMAGES = 4  # a fraction keeps at least this many train images, and one per class
# The curve is drawn on at most this many train images (stratified): each point's fit costs in
# proportion to its images, and past a few thousand the law extrapolates to the whole of train.
CURVE_MAX_IMAGES = 2 * CV_MAX_IMAGES


@dataclass(frozen=True)
class LearningCurve:
    """The linear classifier's val score (``metric``) at each train size, and what 2x and 4x would give."""

    sizes: list[int]
    scores: list[float]
    exponent: float  # b in error = a * n^-b: how fast the error falls with more images
    predicted: dict[str, dict[str, float]]  # "2x"/"4x" (and "all", see ``learning_curve``): images, score, low, high (95%)
    metric: str = "accuracy"  # or "mAP" (multi-label)
    images: int = 0  # the train images the fit has: the last size, unless the curve was drawn on part of them
    now: float = 0.0  # the val score at ``images``: measured, or (a part) the law's

    def sentence(self) -> str:
        """What doubling the images would likely give, in points of the val score."""
        double = self.predicted["2x"]
        gain, low, high = self._points(double)
        part = f", drawn on up to {self.sizes[-1]:,} of them" if self.sizes[-1] < self.images else ""
        sentence = (f"doubling the train images ({self.images} -> {double['images']}) would likely give "
                    f"{gain:+.1f} points of val {self.metric} ({low:+.1f} to {high:+.1f}), by the linear classifier's "
                    f"learning curve{part}")
        if every := self.predicted.get("all"):
            gain, low, high = self._points(every)
            sentence += (f"; all {every['images']:,} train images, not only the sample the time limit allowed, "
                         f"{gain:+.1f} ({low:+.1f} to {high:+.1f})")
        return sentence

    def _points(self, forecast: dict[str, float]) -> tuple[float, float, float]:
        """A forecast's score and interval, in points over the score now."""
        return tuple(100 * (forecast[k] - self.now) for k in ("score", "low", "high"))

    def to_dict(self) -> dict:
        return {"sizes": self.sizes, "metric": self.metric, "val_score": self.scores, "exponent": self.exponent,
                "images": self.images, "predicted": self.predicted, "sentence": self.sentence()}


def nested_subsets(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Row indices of ``y`` for each fraction, each subset inside the next: one random order per class,
    and a fraction takes the first part of every class's order (so each class is represented); a
    multi-label 0/1 matrix: the first part of one seeded order (``stratified_subset``)."""
    if y.ndim == 2:
        return [stratified_subset(y, max(1, round(f * len(y))), seed) for f in fractions]
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    return [np.sort(np.concatenate([order[:max(1, round(f * len(order)))] for order in orders])) for f in fractions]


def _power_law(sizes: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """(log a, b) of ``error = a * n^-b`` by least squares in log-log, b at least 0 (more data never
    predicted to hurt)."""
    log_n, log_e = np.log(sizes), np.log(errors)
    slope, intercept = np.polyfit(log_n, log_e, 1)
    if slope > 0:
        return float(np.mean(log_e)), 0.0
    return float(intercept), float(-slope)


def _extrapolation(sizes: np.ndarray, scores_on, n_val: int, seed: int) -> tuple[float, float, np.ndarray]:
    """The power law's (log a, b) on the curve's points (``scores_on(rows)``: each size's val score on
    those val rows), and ``BOOTSTRAP`` refits on val resampled (rows: (log a, b)); errors floored at
    half an image of val so a perfect point stays finite."""
    floor = 0.5 / n_val
    fit = lambda rows: _power_law(sizes, np.maximum(1 - scores_on(rows), floor))  # noqa: E731
    rng = np.random.default_rng(seed)
    return (*fit(slice(None)), np.array([fit(rng.integers(0, n_val, n_val)) for _ in range(BOOTSTRAP)]))


def _spread_of_fit(sizes: np.ndarray, scores: np.ndarray, log_a: float, b: float) -> float:
    """The variance of the points about the fitted law (score units, two parameters spent): the
    part of the uncertainty a val bootstrap cannot see, from which train images were drawn."""
    residuals = scores - (1 - np.exp(log_a) * sizes ** -b)
    return float(np.sum(residuals ** 2) / max(1, len(sizes) - 2))


def _val_outputs(X, y, X_val, y_val, kind: str, C: float, seed: int) -> tuple[np.ndarray, list]:
    """The sizes of the nested subsets and, per size, each draw's val output: right or wrong per
    image, or (multi-label) the head's scores."""
    from tlpipe.training.multilabel import fit_multilabel_head

    draws = [nested_subsets(y, FRACTIONS, seed + draw) for draw in range(DRAWS)]  # every class in every subset
    outputs = []
    with threadpool_limits(1):
        for i, fraction in enumerate(FRACTIONS):
            # draws average out which images a small subset holds; past CV_MAX_IMAGES that matters little
            subsets = [draws[0][i]] if fraction == 1.0 or len(draws[0][i]) > CV_MAX_IMAGES else [d[i] for d in draws]
            outputs.append([fit_multilabel_head(C, X[rows], y[rows], seed).logits(X_val) if y.ndim == 2
                            else fit_head(kind, C, X[rows], y[rows], seed).predict(X_val) == y_val for rows in subsets])
    return np.array([len(draws[0][i]) for i in range(len(FRACTIONS))], dtype=float), outputs


def learning_curve(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, kind: str, C: float,
                   seed: int = 0, whole: int | None = None) -> LearningCurve | None:
    """The linear classifier ``kind`` at ``C`` (multi-label ``y``: one-vs-rest logistic regression)
    on nested fractions of train (codes ``X``, labels ``y``; at most ``CURVE_MAX_IMAGES`` of them),
    scored on val, and its power law extrapolated to 2x and 4x the train images, and to ``whole``
    ("all") when train is a sample of that many; None when train is too small for a curve (under
    ``MIN_IMAGES`` in the smallest fraction, or classes so small that the fractions hold fewer than
    three sizes: no slope to fit)."""
    classes = y.shape[1] if y.ndim == 2 else len(np.unique(y))
    if len(y) * FRACTIONS[0] < MIN_IMAGES or classes < 2 or len(y_val) < 2:
        return None
    images = len(y)
    if images > CURVE_MAX_IMAGES:
        rows = stratified_subset(y, CURVE_MAX_IMAGES, seed)
        X, y = X[rows], y[rows]
    if len({len(rows) for rows in nested_subsets(y, FRACTIONS, seed)}) < 3:
        return None
    sizes, outputs = _val_outputs(X, y, X_val, y_val, kind, C, seed)
    if y.ndim == 2:
        scores_on = lambda rows: np.array([np.mean([mean_average_precision(y_val[rows], s[rows]) for s in draws])  # noqa: E731
                                           for draws in outputs])
    else:
        scores_on = lambda rows: np.array([np.mean(draws, axis=0)[rows].mean() for draws in outputs])  # noqa: E731
    scores = scores_on(slice(None))
    log_a, b, spread = _extrapolation(sizes, scores_on, len(y_val), seed)
    predicted = {}
    targets = {"2x": 2 * images, "4x": 4 * images, **({"all": whole} if whole and whole > images else {})}
    for name, n in targets.items():
        estimate = 1 - np.exp(log_a) * n ** -b
        half_width = 1.96 * np.sqrt(np.var(1 - np.exp(spread[:, 0]) * n ** -spread[:, 1]) + _spread_of_fit(sizes, scores, log_a, b))
        predicted[name] = {"images": int(n), "score": round(float(estimate), 4),
                           "low": round(float(max(0.0, estimate - half_width)), 4),
                           "high": round(float(min(1.0, estimate + half_width)), 4)}
    now = scores[-1] if sizes[-1] == images else 1 - np.exp(log_a) * images ** -b
    return LearningCurve([int(s) for s in sizes], [round(float(v), 4) for v in scores], round(b, 4), predicted,
                         "mAP" if y.ndim == 2 else "accuracy", images, round(float(now), 4))
