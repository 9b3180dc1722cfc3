"""Cheap signals of how well a frozen ImageNet network transfers to the user's data.

The choice between a linear classifier on the last or an earlier stage, partial and full fine-tuning
depends on how far the data is from ImageNet and how much of the task the frozen features already
solve. Both can be read from the one forward pass the linear strategy needs anyway for its codes
(``frozen_pass.collect_features``: every stage's pooled features, the inputs of every BatchNorm layer,
the penultimate codes and the ImageNet head's confidence); ``compute_signals`` scores them in seconds
(cross-validated probes, kNN, LogME, BatchNorm-statistics gaps, ImageNet confidence).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from tlpipe.errors import TlpipeError
from tlpipe.models import PENULTIMATE
from tlpipe.strategy.frozen_pass import BatchNormStats, FeatureSet
from tlpipe.strategy.logme import logme

PROBE_C = 0.1  # fixed: the probe ranks stages and datasets, it is not the final classifier
KNN_K = 10
MAX_FOLDS = 5


@dataclass
class Signals:
    """How well the frozen network fits the data. Each entry of ``stages`` (feature_info order) and
    ``penultimate`` holds ``probe_accuracy``: logistic regression (C = ``PROBE_C``) on standardised
    features, mean over stratified folds (``probe_std``, ``probe_sem`` over the folds); ``knn_accuracy``:
    distance-weighted cosine kNN on standardised features, same folds; ``logme`` on the raw features;
    ``bn_gap``: mean of ``BatchNormStats.gap`` over that level's BatchNorm layers (NaN without any);
    ``dim``. A multi-label set (``score`` mAP): one-vs-rest probes, each probe's and kNN's figure
    the mean average precision, folds by iterative stratification, LogME on the 0/1 label matrix."""

    stages: list[dict]
    best_stage: str  # highest probe accuracy, ties to kNN accuracy
    penultimate: dict
    imagenet_confidence: dict  # mean_max_prob, mean_entropy (nats); empty without the ImageNet head
    domain_gap: float  # mean bn_gap over the stages and the penultimate level: each depth counts once
    folds: int
    seconds: float  # compute_signals itself (the forward pass is FeatureSet.seconds)
    score: str = "accuracy"  # what probe_accuracy and knn_accuracy measure: accuracy, or mAP (multi-label)

    def to_dict(self) -> dict:
        return asdict(self)


def _scores(X: np.ndarray, y: np.ndarray, cv: list, neighbours: int) -> dict:
    """Cross-validated linear probe and cosine kNN on standardised features, plus LogME on the raw
    ones; for a 0/1 label matrix, one probe per class and both scored by mean average precision."""
    multilabel = y.ndim == 2
    classifier = LogisticRegression(C=PROBE_C, max_iter=1000)
    probe = make_pipeline(StandardScaler(), OneVsRestClassifier(classifier) if multilabel else classifier)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(neighbours, weights="distance", metric="cosine"))
    scoring = "average_precision" if multilabel else None
    probe_acc = cross_val_score(probe, X, y, cv=cv, scoring=scoring)
    return {
        "probe_accuracy": float(probe_acc.mean()), "probe_std": float(probe_acc.std()),
        "probe_sem": float(probe_acc.std(ddof=1) / np.sqrt(len(probe_acc))),
        "knn_accuracy": float(cross_val_score(knn, X, y, cv=cv, scoring=scoring).mean()), "logme": logme(X, y),
        "dim": int(X.shape[1]),
    }


def _bn_gap(layers: list[BatchNormStats]) -> float:
    return float(np.mean([layer.gap() for layer in layers])) if layers else float("nan")


def compute_signals(features: FeatureSet, seed: int = 0) -> Signals:
    """Score every stage and the penultimate codes; see ``Signals``. BLAS runs on one thread: on
    matrices this small, two threads on a busy 2-core machine made it 6x slower (hymenoptera)."""
    with threadpool_limits(1):
        return _compute_signals(features, seed)


def _compute_signals(features: FeatureSet, seed: int) -> Signals:
    start = time.perf_counter()
    y = features.labels
    multilabel = y.ndim == 2
    folds = min(MAX_FOLDS, int(y.sum(axis=0).min() if multilabel else np.bincount(y)[np.unique(y)].min()))
    if folds < 2:
        raise TlpipeError("the transfer signals that choose the strategy need at least 2 train images in every class: "
                          "add images, or name the strategy (--strategy linear fits on 1 image a class)")
    splitter = MultilabelStratifiedKFold if multilabel else StratifiedKFold
    cv = list(splitter(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))  # the same folds for all
    neighbours = min(KNN_K, min(len(train) for train, _ in cv))
    gaps = {name: _bn_gap(layers) for name, layers in features.bn_stats.items()}
    stages = [
        {"name": name, **_scores(X, y, cv, neighbours), "bn_gap": gaps.get(name, float("nan"))}
        for name, X in features.stages.items()
    ]
    penultimate = {**_scores(features.codes, y, cv, neighbours), "bn_gap": gaps.get(PENULTIMATE, float("nan"))}
    confidence = {}
    if features.imagenet_confidence is not None:
        top, entropy = features.imagenet_confidence.astype(np.float64).mean(axis=0)
        confidence = {"mean_max_prob": float(top), "mean_entropy": float(entropy)}
    # Each depth counts once, whatever number of blocks the architecture puts in it: low-level
    # shifts (colour, texture: microscopy, aerial views) and high-level ones both move the summary.
    levels = [s["bn_gap"] for s in [*stages, penultimate] if not np.isnan(s["bn_gap"])]
    best = max(stages, key=lambda s: (s["probe_accuracy"], s["knn_accuracy"]))["name"] if stages else PENULTIMATE
    return Signals(
        stages=stages,
        best_stage=best,
        penultimate=penultimate, imagenet_confidence=confidence,
        domain_gap=float(np.mean(levels)) if levels else float("nan"),
        folds=folds, seconds=time.perf_counter() - start, score="mAP" if multilabel else "accuracy",
    )
