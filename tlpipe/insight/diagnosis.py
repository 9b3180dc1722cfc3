"""What a fit learned about its data, beside the model: the record the diagnose stage hands on."""
from __future__ import annotations

from dataclasses import dataclass

from tlpipe.insight.label_issues import LabelIssues
from tlpipe.insight.learning_curve import LearningCurve


@dataclass(frozen=True)
class Diagnosis:
    """What the data says (the diagnose stage): train images whose label the codes contradict, the
    learning curve, and with ``exclude_label_issues`` how val changed without the suspects."""

    label_issues: LabelIssues | None = None
    suspects: tuple = ()  # the flagged train Samples, in the order of label_issues.rows
    learning_curve: LearningCurve | None = None
    excluded: dict | None = None  # images, kept_for_their_class, score (accuracy or mAP), val_with, val_without

    def to_dict(self) -> dict:
        return {"label_issues": {**self.label_issues.to_dict(), **({"excluded": self.excluded} if self.excluded else {})}
                if self.label_issues is not None else {"note": "too few images per class to hold any out"},
                "learning_curve": self.learning_curve.to_dict() if self.learning_curve is not None else
                {"note": "train too small for a curve"}}
