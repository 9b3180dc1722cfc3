"""Probabilities a user can read as such: temperature scaling (Guo et al., 2017) fitted on
validation logits, and the measures that say whether it helped.

``calibrate(head, X_val, y_val)`` fits one scale on the head's logits (a bounded 1-D search on its
log: milliseconds), keeps it only when the validation negative log-likelihood improves, and returns
the head to save with what was measured before and after, and on how many images.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

if TYPE_CHECKING:  # the linear heads fit their SVM's scale with fit_scale: no import back at run time
    from tlpipe.training.head import LinearHead

ECE_BINS = 15


def _as_logits(scores: np.ndarray) -> np.ndarray:
    """Two-class decision values ``d`` as the logits ``(-d/2, d/2)`` (softmax == sigmoid(d))."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.stack([-scores / 2, scores / 2], axis=1) if scores.ndim == 1 else scores


def nll(logits: np.ndarray, y: np.ndarray, scale: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(scale * logits)``."""
    return float(-log_softmax(_as_logits(logits) * scale, axis=1)[np.arange(len(y)), y].mean())


PRIOR_SD = 1.0  # of log(scale / start): a Gaussian prior, so a few images cannot drive the temperature to 0


def fit_scale(logits: np.ndarray, y: np.ndarray, start: float = 1.0) -> float:
    """The ``scale`` (1 / temperature) that maximises the posterior on (``logits``, ``y``): the mean
    ``nll`` plus a Gaussian prior on ``log(scale / start)`` (one image's worth of weight per unit of
    ``1 / PRIOR_SD**2``). On thousands of images that is plain temperature scaling; on a handful, or
    a validation set the head gets all right (where the NLL falls for ever as the scale grows), it
    stays near ``start``. Searched on the log, within a factor e^5 of ``start``."""
    def objective(log_s: float) -> float:
        return nll(logits, y, start * np.exp(log_s)) + log_s ** 2 / (2 * PRIOR_SD ** 2 * len(y))

    return float(start * np.exp(minimize_scalar(objective, bounds=(-5, 5), method="bounded").x))


def confidence_bins(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Each image's equal-width bin of top-class confidence, that confidence, and whether it was right."""
    confidence, correct = probabilities.max(axis=1), probabilities.argmax(axis=1) == y
    return np.minimum((confidence * bins).astype(int), bins - 1), confidence, correct


def expected_calibration_error(probabilities: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """|accuracy - confidence| of the top class, averaged over equal-width confidence bins weighted
    by their share of the images (the usual ECE, 15 bins)."""
    which, confidence, correct = confidence_bins(probabilities, y, bins)
    total = 0.0
    for b in np.unique(which):
        rows = which == b
        total += rows.mean() * abs(correct[rows].mean() - confidence[rows].mean())
    return float(total)


def calibrate(head: LinearHead, X_val: np.ndarray, y_val: np.ndarray) -> tuple[LinearHead, dict]:
    """The head with the scale fitted on validation when it lowers the validation NLL (else as it
    was), and the NLL and ECE before and after; multi-label: ``calibrate_multilabel``."""
    if head.multilabel:
        return calibrate_multilabel(head, X_val, y_val)
    logits = head.logits(X_val)
    scale = fit_scale(logits, y_val, start=head.scale)
    before, after = nll(logits, y_val, head.scale), nll(logits, y_val, scale)
    kept = after < before
    calibrated = dataclasses.replace(head, scale=scale) if kept else head
    report = {
        "temperature": round(1 / calibrated.scale, 4), "kept": kept, "n_val": int(len(y_val)),
        "nll_before": before, "nll_after": min(before, after),
        "ece_before": expected_calibration_error(softmax(logits * head.scale, axis=1), y_val),
        "ece_after": expected_calibration_error(softmax(logits * calibrated.scale, axis=1), y_val),
    }
    return calibrated, report


MIN_THRESHOLD_POSITIVES = 5  # val images of a class below which its threshold stays DEFAULT_THRESHOLD
DEFAULT_THRESHOLD = 0.5


def decision_thresholds(probabilities: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Per class, the probability at or over which it is predicted: one that maximises the class's
    F1 on (``probabilities``, ``Y``), halfway between two val images' scores. A class with fewer than ``MIN_THRESHOLD_POSITIVES``
    positives keeps ``DEFAULT_THRESHOLD``: an F1-optimal cut on a handful of images is noise."""
    from sklearn.metrics import precision_recall_curve

    thresholds = np.full(Y.shape[1], DEFAULT_THRESHOLD)
    for j in range(Y.shape[1]):
        if Y[:, j].sum() >= MIN_THRESHOLD_POSITIVES:
            precision, recall, cuts = precision_recall_curve(Y[:, j], probabilities[:, j])
            f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
            best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no cut
            # halfway down to the next lower score: an image at the cut is not decided by float rounding
            thresholds[j] = (cuts[best] + (cuts[best - 1] if best else 0.0)) / 2
    return thresholds


def calibrate_multilabel(head: LinearHead, X_val: np.ndarray, Y_val: np.ndarray) -> tuple[LinearHead, dict]:
    """A multi-label head with each class's sigmoid scale fitted on validation (kept where it lowers
    that class's NLL) and each class's decision threshold chosen there (``decision_thresholds``)."""
    logits = head.logits(X_val)
    before = np.array([nll(logits[:, j], Y_val[:, j], s) for j, s in enumerate(head.scale)])
    fitted = np.array([fit_scale(logits[:, j], Y_val[:, j], start=float(s)) for j, s in enumerate(head.scale)])
    after = np.array([nll(logits[:, j], Y_val[:, j], s) for j, s in enumerate(fitted)])
    scale = np.where(after < before, fitted, head.scale)
    scaled = dataclasses.replace(head, scale=scale)
    thresholds = decision_thresholds(scaled.proba_from_logits(logits), Y_val)
    report = {"temperatures": [round(1 / s, 4) for s in scale], "kept": int((after < before).sum()), "n_val": int(len(Y_val)),
              "nll_before": float(before.mean()), "nll_after": float(np.minimum(before, after).mean()),
              "thresholds": [round(float(t), 6) for t in thresholds],
              "threshold_rule": f"F1-optimal on val; {DEFAULT_THRESHOLD} for a class with under {MIN_THRESHOLD_POSITIVES} "
                                "positives there"}
    return dataclasses.replace(scaled, thresholds=thresholds), report
