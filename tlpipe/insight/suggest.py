"""What to label next: from a folder of unlabelled images, the ones whose labels would teach the model
most. With few labels, the images that teach most are typical ones of regions nothing labelled
covers (Hacohen et al., 2022, TypiClust); uncertainty alone picks near-copies of one confusing image.
So the codes of the labelled and unlabelled images together are clustered (k-means, as many
clusters as labelled images plus picks, at most ``MAX_CLUSTERS``), and from each cluster without
a labelled image, largest first, one image is picked: the one most typical (nearest its centre) and
uncertain, the two standardised within the cluster and weighed ``1 : UNCERTAINTY_WEIGHT``. With more
labelled images than clusters, every cluster holds some: the least covered (smallest labelled share)
come first, so the picks stay spread over the data rather than fall back on uncertainty alone.
Near-copies of a labelled image (cosine similarity of the codes over ``DUPLICATE_SIMILARITY``) are
skipped: their label is known. Measured in bench/suggest.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CLUSTERS = 1000
UNCERTAINTY_WEIGHT = 0.5
DUPLICATE_SIMILARITY = 0.98


@dataclass(frozen=True)
class Suggestions:
    """Rows into the unlabelled images, in the order to label them, with each one's uncertainty."""

    rows: np.ndarray
    uncertainty: np.ndarray  # of each picked row, in [0, 1]
    duplicates: int  # unlabelled images skipped as near-copies of labelled images


def uncertainty(probabilities: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Entropy of each row's prediction over its maximum, in [0, 1]; multi-label: the mean binary
    entropy of its classes."""
    p = np.clip(probabilities, 1e-12, 1.0)
    if multilabel:
        q = np.clip(1 - probabilities, 1e-12, 1.0)
        return -(p * np.log2(p) + q * np.log2(q)).mean(axis=1)
    return -(p * np.log(p)).sum(axis=1) / np.log(probabilities.shape[1])


def _standard(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / (values.std() + 1e-9)


def suggest(probabilities: np.ndarray, codes: np.ndarray, n: int, labelled: np.ndarray | None = None,
            multilabel: bool = False, seed: int = 0) -> Suggestions:
    """The ``n`` unlabelled images (their ``probabilities`` and ``codes``) to label next, given the
    ``labelled`` images' codes (None: none known)."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import normalize

    unit = normalize(np.asarray(codes, np.float32))
    known = normalize(np.asarray(labelled, np.float32)) if labelled is not None and len(labelled) else np.zeros((0, unit.shape[1]), np.float32)
    nearest_known = _nearest_similarity(unit, known)
    usable = np.flatnonzero(nearest_known < DUPLICATE_SIMILARITY)
    scores = uncertainty(probabilities, multilabel)
    n = min(n, len(usable))
    if n == 0:
        return Suggestions(np.zeros(0, np.int64), np.zeros(0), len(unit) - len(usable))
    together = np.vstack([known, unit[usable]])
    clusters = min(len(known) + n, MAX_CLUSTERS, len(together))
    kmeans = KMeans(clusters, n_init=1, random_state=seed).fit(together)
    member = kmeans.labels_[len(known):]
    typical = -np.linalg.norm(unit[usable] - kmeans.cluster_centers_[member], axis=1)
    sizes = np.bincount(member, minlength=clusters)
    covered = np.bincount(kmeans.labels_[:len(known)], minlength=clusters)
    labelled_share = covered / np.maximum(covered + sizes, 1)
    picked = []
    for cluster in np.lexsort((-sizes, labelled_share))[:n]:  # uncovered first, largest first; at scale, the least covered
        if sizes[cluster] == 0:
            continue
        rows = np.flatnonzero(member == cluster)
        merit = _standard(typical[rows]) + UNCERTAINTY_WEIGHT * _standard(scores[usable][rows])
        picked.append(rows[int(np.argmax(merit))])
    rows = usable[np.array(_most_uncertain_rest(picked, scores[usable], unit[usable], n), dtype=np.int64)]
    return Suggestions(rows, scores[rows], len(unit) - len(usable))


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
