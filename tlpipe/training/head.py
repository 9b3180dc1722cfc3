"""The linear head every tlpipe model predicts through: ``codes @ weight.T + bias``, then a softmax
(or a sigmoid a class, multi-label) over the calibrated temperature. NumPy and torch only, so loading
a bundle to predict needs no scikit-learn; ``tlpipe.training.linear`` fits it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CLASSIFIERS = ("logreg", "svm")
PROBABILITY_NOTES = {
    "logreg": "softmax of the logistic-regression scores over the temperature fitted on val (1: none kept)",
    "svm": "softmax of the SVM decision values over one temperature (out-of-fold train decisions, then val)",
    "finetune": "softmax of the fine-tuned network's logits over the temperature fitted on val (1: none kept)",
}


@dataclass
class LinearHead:
    """``probabilities = softmax(temperature_scale * (codes @ weight.T + bias))``; a multi-label head
    (``thresholds`` set): ``sigmoid(scale * logits)``, a scale per class, each class predicted where
    its probability reaches its threshold."""

    weight: np.ndarray  # (n_classes, n_features), float32
    bias: np.ndarray  # (n_classes,)
    kind: str
    scale: float | np.ndarray = 1.0  # multi-label: (n_classes,)
    thresholds: np.ndarray | None = None  # multi-label only: (n_classes,), chosen on val

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def logits(self, codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = torch.from_numpy(np.ascontiguousarray(codes, np.float32)) @ torch.from_numpy(self.weight).T
            return (out + torch.from_numpy(self.bias)).numpy()

    def predict_proba(self, codes: np.ndarray) -> np.ndarray:
        return self.proba_from_logits(self.logits(codes))

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of logits already computed (``logits``): one pass for both."""
        if self.multilabel:
            return torch.sigmoid(torch.from_numpy(logits) * torch.from_numpy(np.asarray(self.scale, np.float32))).numpy()
        return torch.softmax(torch.from_numpy(logits) * self.scale, dim=1).numpy()

    def predict(self, codes: np.ndarray) -> np.ndarray:
        """Class indices; multi-label: a 0/1 row of the classes at or over their thresholds."""
        if self.multilabel:
            return (self.predict_proba(codes) >= self.thresholds).astype(np.int64)
        return self.logits(codes).argmax(axis=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": torch.from_numpy(self.weight),
            "bias": torch.from_numpy(self.bias),
            "scale": torch.tensor(np.atleast_1d(self.scale), dtype=torch.float32),
            **({"thresholds": torch.tensor(self.thresholds, dtype=torch.float32)} if self.multilabel else {}),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], kind: str) -> "LinearHead":
        if "thresholds" in tensors:
            return cls(tensors["weight"].numpy(), tensors["bias"].numpy(), kind, tensors["scale"].numpy().astype(np.float64),
                       tensors["thresholds"].numpy().astype(np.float64))
        return cls(tensors["weight"].numpy(), tensors["bias"].numpy(), kind, float(tensors["scale"][0]))
