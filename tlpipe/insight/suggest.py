"""What to label next: from a folder of unlabelled images, the ones whose labels would teach the model
most. Uncertainty alone picks near-copies of one confusing image, so the picks are uncertain and
diverse (Zhdanov, 2019, "Diverse mini-batch active learning"): of the ``PREFILTER`` x n most uncertain
images, the codes are clustered into n groups by k-means weighted by uncertainty, and the image
nearest each centre is picked (at most ``MAX_CLUSTERS`` groups; more picks than that are the most
uncertain others). Near-copies of a labelled image (cosine similarity of the codes over
``DUPLICATE_SIMILARITY``) are skipped: their label is known.

Measured in bench/suggest.py (val accuracy after adding 100 picks, against 100 random images; 10-15
seeds; 10, 20 and 40% of train labelled on bloodcells, dtd10 and rsscn7): +0.3 points on average over
the nine settings, ahead in six of them. A clustering on typicality (TypiClust) and uncertainty, the
method before, scored -0.5 and was ahead in three.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

MAX_CLUSTERS = 1000
PREFILTER = 10  # the beta of Zhdanov (2019): clusters are made of the 10 x n most uncertain images
DUPLICATE_SIMILARITY = 0.98


@dataclass(frozen=True)
class Suggestions:
    """Rows into the unlabelled images, in the order to label them, with each one's uncertainty."""

    rows: np.ndarray
    uncertainty: np.ndarray  # of each picked row, in [0, 1]
    duplicates: int  # unlabelled images skipped as near-copies of labelled images


def uncertainty(probabilities: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Each row's uncertainty in [0, 1]: one minus the margin between its two likeliest classes;
    multi-label: the mean binary entropy of its classes."""
    p = np.clip(probabilities, 1e-12, 1.0)
    if multilabel:
        q = np.clip(1 - probabilities, 1e-12, 1.0)
        return -(p * np.log2(p) + q * np.log2(q)).mean(axis=1)
    top = np.sort(probabilities, axis=1)
    return 1.0 - (top[:, -1] - top[:, -2])


def suggest(probabilities: np.ndarray, codes: np.ndarray, n: int, labelled: np.ndarray | None = None,
            multilabel: bool = False, seed: int = 0) -> Suggestions:
    """The ``n`` unlabelled images (their ``probabilities`` and ``codes``) to label next, given the
    ``labelled`` images' codes (None: none known): the cluster picks most uncertain first, then (more
    than ``MAX_CLUSTERS`` picks) the most uncertain others."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import normalize

    unit = normalize(np.asarray(codes, np.float32))
    known = normalize(np.asarray(labelled, np.float32)) if labelled is not None and len(labelled) else np.zeros((0, unit.shape[1]), np.float32)
    usable = np.flatnonzero(_nearest_similarity(unit, known) < DUPLICATE_SIMILARITY)
    scores = uncertainty(probabilities, multilabel)[usable]
    n = min(n, len(usable))
    if n == 0:
        return Suggestions(np.zeros(0, np.int64), np.zeros(0), len(unit) - len(usable))
    clusters = min(n, MAX_CLUSTERS)
    candidates = np.argsort(-scores, kind="stable")[:PREFILTER * clusters]
    points = unit[usable[candidates]]
    with warnings.catch_warnings():  # identical codes (copies among the candidates) give fewer groups: fewer picks from them
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(clusters, n_init=1, random_state=seed).fit(points, sample_weight=scores[candidates] + 1e-6)
    distance = np.linalg.norm(points - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    nearest = [members[np.argmin(distance[members])] for members in
               (np.flatnonzero(kmeans.labels_ == cluster) for cluster in range(clusters)) if len(members)]
    picked = sorted((int(candidates[row]) for row in nearest), key=lambda row: -scores[row])
    order = np.array(_most_uncertain_rest(picked, scores, unit[usable], n), dtype=np.int64)  # rows into usable
    return Suggestions(usable[order], scores[order], len(unit) - len(usable))


def _nearest_similarity(unit: np.ndarray, known: np.ndarray, cells: int = 2 ** 25) -> np.ndarray:
    """Each row's cosine similarity to its nearest ``known`` row (-1 without any), at most ``cells``
    similarities (128 MB) at a time: 100k unlabelled against 60k labelled images are 24 GB at once."""
    if not len(known):
        return np.full(len(unit), -1.0)
    chunk = max(1, cells // len(known))
    return np.concatenate([(unit[start:start + chunk] @ known.T).max(axis=1) for start in range(0, len(unit), chunk)])


def _most_uncertain_rest(picked: list[int], scores: np.ndarray, unit: np.ndarray, n: int) -> list[int]:
    """``picked``, then (more picks than clusters) the most uncertain others, no near-copy of a pick."""
    order, taken = list(picked), set(picked)
    codes = np.zeros((n, unit.shape[1]), unit.dtype)  # of the picks so far, in their first rows
    codes[:len(order)] = unit[order]
    for row in np.argsort(-scores, kind="stable"):
        if len(order) >= n:
            break
        if row not in taken and (not order or (codes[:len(order)] @ unit[row]).max() < DUPLICATE_SIMILARITY):
            codes[len(order)] = unit[row]
            order.append(int(row))
            taken.add(int(row))
    return order
