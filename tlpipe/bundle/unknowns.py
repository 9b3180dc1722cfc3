"""Unknown images: a classifier fed a picture of nothing it knows still answers with confidence. The
bundle answers ``unknown`` instead when the image's codes lie far from every class it was trained on.

The score is the Mahalanobis distance of the codes, scaled to unit length, to the nearest class mean
(Lee et al., 2018), one covariance shared by the classes, estimated with Ledoit-Wolf shrinkage
(scikit-learn) from the train codes: the codes have more dimensions than most datasets have
images. Measured on a hymenoptera model fed dtd10, bloodcells and rsscn7 images, at 5% false
rejection on its val: on unit-length codes it rejected 99% of them, on the raw codes 84%; the
head's energy and top softmax probability, 24%.
The threshold keeps ``1 - false_rejection`` of the val images (a split the means never saw).

Stored as a factor ``L`` of the precision (precision = L L^T, from the covariance's eigenvectors,
variances floored) and the class means times it, so a score is one matrix product and a nearest
squared distance: ``min_c |z L - m_c|^2``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from tlpipe.data.dataset import stratified_subset

DEFAULT_FALSE_REJECTION = 0.05
# The shared covariance is estimated from at most this many train images (stratified by class): a
# D x D estimate from more moves little, and on every image of 60,000 its float64 work arrays took 3.5 GB.
COVARIANCE_MAX_IMAGES = 10_000
DESCRIPTION = ("squared Mahalanobis distance of the unit-length codes to the nearest train class mean (shared Ledoit-Wolf "
               "covariance); over the threshold, the image is unknown")


def unit_rows(codes: torch.Tensor) -> torch.Tensor:
    """Each row over its length: the direction of the codes, not their size (what the score reads)."""
    return codes / codes.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class UnknownDetector:
    """``score(codes)``: how far each image lies from the classes; ``unknown(codes)``: over ``threshold``."""

    projection: np.ndarray  # (D, D) float32, L: precision = L L^T
    centres: np.ndarray  # (K, D) float32, class means @ L
    threshold: float
    false_rejection: float  # the val share over the threshold it was set for

    def score(self, codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            projected = unit_rows(torch.from_numpy(np.ascontiguousarray(codes, np.float32))) @ torch.from_numpy(self.projection)
            return torch.cdist(projected, torch.from_numpy(self.centres)).min(dim=1).values.square().numpy()

    def unknown(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.threshold

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"projection": torch.from_numpy(np.ascontiguousarray(self.projection, np.float32)),
                "centres": torch.from_numpy(np.ascontiguousarray(self.centres, np.float32))}

    def to_dict(self) -> dict:
        return {"score": DESCRIPTION, "threshold": self.threshold, "false_rejection": self.false_rejection}


def fit_unknowns(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, false_rejection: float = DEFAULT_FALSE_REJECTION
                 ) -> UnknownDetector | None:
    """Class means from the train codes ``X`` (labels ``y``; a multi-label 0/1 matrix: one mean for all),
    the shared covariance from a stratified ``COVARIANCE_MAX_IMAGES`` of them, the threshold from the val
    codes ``X_val``; None when no image differs from its class mean (one image a class): there is no
    spread to measure distance by."""
    from sklearn.covariance import LedoitWolf

    groups = np.zeros(len(X), int) if y.ndim == 2 else np.unique(y, return_inverse=True)[1]
    means = _unit_means(X, groups)
    rows = stratified_subset(groups, COVARIANCE_MAX_IMAGES, seed=0)
    residuals = _unit(X[rows]) - means[groups[rows]]
    if not np.abs(residuals).max(initial=0.0) > 0 or len(X_val) == 0:
        return None
    variances, axes = np.linalg.eigh(LedoitWolf().fit(residuals).covariance_)
    variances = np.maximum(variances, variances.max() * 1e-6)  # a direction of no spread: not infinitely far
    projection = (axes / np.sqrt(variances)).astype(np.float32)  # precision = projection @ projection.T
    detector = UnknownDetector(projection, (means @ projection).astype(np.float32), np.inf, false_rejection)
    return dataclasses.replace(detector, threshold=_threshold(detector.score(X_val), false_rejection))


def _unit(codes: np.ndarray) -> np.ndarray:
    return unit_rows(torch.from_numpy(np.asarray(codes, np.float64))).numpy()


def _unit_means(X: np.ndarray, groups: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """The mean unit-length row of each group, summed a chunk of rows at a time in float64 (no
    float64 copy of every code)."""
    n_groups = groups.max() + 1
    sums = np.zeros((n_groups, X.shape[1]))
    for start in range(0, len(X), chunk):
        part = slice(start, start + chunk)
        np.add.at(sums, groups[part], _unit(X[part]))
    return sums / np.bincount(groups, minlength=n_groups)[:, None]


def _threshold(scores: np.ndarray, false_rejection: float) -> float:
    """Halfway between the last val score kept and the first rejected (so float rounding in an export
    cannot flip a val image), with at most ``false_rejection`` of val over it."""
    ordered = np.sort(scores)
    kept = int(np.ceil((1 - false_rejection) * len(ordered)))
    if kept >= len(ordered):
        return float(ordered[-1] * 1.5)  # too few val images to reject any: above the largest
    return float((ordered[kept - 1] + ordered[kept]) / 2)


def unknowns_from_tensors(tensors: dict[str, torch.Tensor], threshold: float, false_rejection: float) -> UnknownDetector:
    return UnknownDetector(tensors["projection"].numpy(), tensors["centres"].numpy(), float(threshold), float(false_rejection))
