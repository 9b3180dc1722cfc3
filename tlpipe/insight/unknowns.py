"""Unknown images: a classifier fed a picture of nothing it knows still answers with confidence. The
bundle answers ``unknown`` instead when the image's codes lie far from every class it was trained on.

The score is the Mahalanobis distance of the codes to the nearest class mean (Lee et al., 2018), one
covariance shared by the classes, estimated with Ledoit-Wolf shrinkage (scikit-learn) from the
train codes: the codes have more dimensions than most datasets have images. Measured against the
head's own scores on a hymenoptera model fed dtd10, bloodcells and rsscn7 images, at 5% false
rejection on its val: Mahalanobis rejected 90% of them, energy and the top softmax probability 24%.
The threshold keeps ``1 - false_rejection`` of the val images (a split the means never saw).

Stored as the precision's Cholesky factor ``L`` (precision = L L^T) and the class means times it,
so a score is one matrix product and a nearest squared distance: ``min_c |z L - m_c|^2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_FALSE_REJECTION = 0.05
DESCRIPTION = ("squared Mahalanobis distance of the codes to the nearest train class mean (shared Ledoit-Wolf "
               "covariance); over the threshold, the image is unknown")


@dataclass(frozen=True)
class UnknownDetector:
    """``score(codes)``: how far each image lies from the classes; ``unknown(codes)``: over ``threshold``."""

    projection: np.ndarray  # (D, D) float32, L
    centres: np.ndarray  # (K, D) float32, class means @ L
    threshold: float
    false_rejection: float  # the val share over the threshold it was set for

    def score(self, codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            projected = torch.from_numpy(np.ascontiguousarray(codes, np.float32)) @ torch.from_numpy(self.projection)
            return torch.cdist(projected, torch.from_numpy(self.centres)).min(dim=1).values.square().numpy()

    def unknown(self, scores: np.ndarray) -> np.ndarray:
        return scores > self.threshold

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"projection": torch.from_numpy(np.ascontiguousarray(self.projection, np.float32)),
                "centres": torch.from_numpy(np.ascontiguousarray(self.centres, np.float32))}

    def to_dict(self) -> dict:
        return {"score": DESCRIPTION, "threshold": self.threshold, "false_rejection": self.false_rejection}


def fit_unknowns(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, false_rejection: float = DEFAULT_FALSE_REJECTION
                 ) -> UnknownDetector:
    """Class means and the shared covariance from the train codes ``X`` (labels ``y``; a multi-label
    0/1 matrix: one mean for all), the threshold from the val codes ``X_val``."""
    from scipy.linalg import cholesky
    from sklearn.covariance import LedoitWolf

    X = np.asarray(X, np.float64)
    groups = np.zeros(len(X), int) if y.ndim == 2 else np.unique(y, return_inverse=True)[1]
    means = np.stack([X[groups == g].mean(axis=0) for g in range(groups.max() + 1)])
    precision = LedoitWolf().fit(X - means[groups]).precision_
    projection = cholesky((precision + precision.T) / 2, lower=True)
    detector = UnknownDetector(projection.astype(np.float32), (means @ projection).astype(np.float32), np.inf, false_rejection)
    return UnknownDetector(detector.projection, detector.centres, _threshold(detector.score(X_val), false_rejection),
                           false_rejection)


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
