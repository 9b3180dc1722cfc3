"""Wrong labels: which train images are likely filed under the wrong class.

Confident learning (Northcutt et al., 2021) by ``cleanlab``, a well-kept library, fed with
out-of-fold probabilities of a logistic regression on the fit's cached codes (softmax; one-vs-rest
for a multi-label set): each train image is scored by a classifier that never saw its label, so a
label the codes contradict stands out. On
codes this costs seconds (dtd10, 300 x 1,280: 1 s), so every fit can afford it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from tlpipe.training.linear import cv_path, cv_rows, linear_estimator

MAX_FOLDS = 5
# Out-of-fold probabilities averaged over this many fold splits: one split's luck (which images share a
# fold) moves an image's score. With 10% of train labels flipped (bench/label_noise.py's method on the
# default codes, 5 seeds), three splits against one raised the flagged set's precision from 0.54 to 0.59
# (bloodcells; 0.55 to 0.61 on the codes its fit taps), 0.75 to 0.80 (dtd10) and 0.51 to 0.55 (rsscn7) at
# the same recall; five gave no more. The cost: 0.5 s more on bloodcells' 800 images (the C search stays one).
SPLITS = 3
# cleanlab's filter for one label an image: as many images as confident learning counts as mislabelled,
# those of lowest self-confidence. Measured against its "both" on the penultimate codes with 10% of
# train labels flipped at random (mean of 3 seeds; precision / recall): dtd10 0.83 / 0.74 against
# 0.69 / 0.70, bloodcells 0.56 / 0.83 against 0.47 / 0.83, rsscn7 0.55 / 0.92 against 0.53 / 0.91,
# hymenoptera 0.98 / 0.75 against 0.89 / 0.92. Multi-label sets keep "both" (not measured there).
SINGLE_LABEL_FILTER = "low_self_confidence"


@dataclass(frozen=True)
class LabelIssues:
    """The train images confident learning flags, most suspect first: their row in the train split,
    the class the codes suggest, and the label quality (self-confidence: the out-of-fold
    probability of the given label; low is suspect)."""

    rows: np.ndarray  # indices into the train split
    suggested: np.ndarray  # per flagged row: a class index, or (multi-label) its 0/1 row of classes
    quality: np.ndarray  # per flagged row, in [0, 1]
    C: float  # the logistic regression's C, by cross-validation
    checked: int  # train images scored
    network: str = "pretrained"  # whose codes: the pretrained network's, or the "fine-tuned" one's

    def __len__(self) -> int:
        return len(self.rows)

    def excludable(self, y: np.ndarray) -> np.ndarray:
        """The flagged rows to leave out of train (labels ``y``), most suspect first, while every class
        keeps at least half of its images: a class the codes contradict as a whole is a question
        about the class, not about some labels, and a class left empty would leave the model."""
        per_class = y if y.ndim == 2 else np.eye(int(y.max()) + 1, dtype=np.int64)[y]
        left = per_class.sum(axis=0)
        floor, rows = np.ceil(left / 2), []
        for row in self.rows:
            if np.all(left - per_class[row] >= floor):
                left = left - per_class[row]
                rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    def to_dict(self) -> dict:
        kept = ("pruned by noise rate and by class" if self.suggested.ndim == 2 else  # the filters find_label_issues uses
                "as many images as its confident joint counts as mislabelled, those of lowest self-confidence")
        return {"flagged": len(self), "checked": self.checked, "C": self.C,
                "method": f"confident learning (cleanlab: {kept}, ranked by self-confidence) on out-of-fold "
                          f"logistic-regression probabilities of the {self.network} network's codes (one-vs-rest "
                          "for multi-label sets)", "network": self.network}


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, c_grid: tuple[float, ...], seed: int = 0
                              ) -> tuple[np.ndarray, float] | None:
    """Each train image's class probabilities from a softmax regression fitted on the other folds (C by
    cross-validated accuracy, on ``cv_rows``; each fold's fit on at most ``CV_MAX_IMAGES`` of its
    rows, so the cost stops growing with train), the mean over ``SPLITS`` fold splits, and that C;
    None when a class has a single image (no fold could hold it out)."""
    classes, counts = np.unique(y, return_counts=True)
    folds = min(MAX_FOLDS, int(counts.min(initial=len(y))))
    if folds < 2 or len(classes) < 2:
        return None
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    rows = cv_rows(y, seed, least=folds)
    probabilities = np.zeros((len(y), len(classes)))
    with threadpool_limits(1):  # as LinearProbe: BLAS threads only slow these small fits on a busy machine
        scores, _ = cv_path("logreg", X[rows], y[rows], cv, c_grid, seed)
        # the largest of equally accurate C values: the least shrunk probabilities, which confident
        # learning reads (on separable codes every C ties, and the smallest leaves them near uniform)
        C = float(c_grid[len(scores) - 1 - int(np.argmax(scores[::-1]))])
        for repeat in range(SPLITS):
            for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed + repeat).split(X, y):
                kept = train[cv_rows(y[train], seed)]
                probabilities[test] += linear_estimator("logreg", C, seed).fit(X[kept], y[kept]).predict_proba(X[test])
    return probabilities / SPLITS, C


def out_of_fold_label_probabilities(X: np.ndarray, Y: np.ndarray, c_grid: tuple[float, ...], seed: int = 0
                                    ) -> tuple[np.ndarray, float] | None:
    """``out_of_fold_probabilities`` for a 0/1 label matrix ``Y``: a sigmoid per class from the one-vs-rest
    logistic regression fitted on the other folds (iteratively stratified; C by cross-validated mAP);
    None when the rarest class has a single image."""
    from tlpipe.training.multilabel import MultilabelProbe, fit_multilabel_head, multilabel_folds

    folds = min(MAX_FOLDS, int(Y.sum(axis=0).min(initial=len(Y))))
    if folds < 2:
        return None
    C = MultilabelProbe(tuple(c_grid), folds, seed).fit(X, Y, X[:1], Y[:1]).C_
    probabilities = np.zeros(Y.shape)
    for train, test in multilabel_folds(Y, folds, seed):
        kept = train[cv_rows(Y[train], seed)]
        head = fit_multilabel_head(C, X[kept], Y[kept], seed)
        probabilities[test] = 1 / (1 + np.exp(-head.logits(X[test])))
    return probabilities, C


def find_label_issues(X: np.ndarray, y: np.ndarray, c_grid: tuple[float, ...], seed: int = 0) -> LabelIssues | None:
    """The train images (codes ``X``, labels ``y``: class indices, or a multi-label 0/1 matrix) whose
    label the codes contradict, most suspect first; None when the classes are too small to hold any
    image out."""
    from cleanlab.filter import find_label_issues as single_label_issues
    from cleanlab.multilabel_classification.filter import find_label_issues as multilabel_issues

    multilabel = y.ndim == 2
    scored = (out_of_fold_label_probabilities if multilabel else out_of_fold_probabilities)(X, y, c_grid, seed)
    if scored is None:
        return None
    probabilities, C = scored
    # n_jobs=1: cleanlab's default forks a pool, and a forked torch process can hang in it
    if multilabel:
        rows = multilabel_issues([list(np.flatnonzero(row)) for row in y], probabilities, filter_by="both",
                                 return_indices_ranked_by="self_confidence", n_jobs=1)
    else:
        rows = single_label_issues(y, probabilities, filter_by=SINGLE_LABEL_FILTER,
                                   return_indices_ranked_by="self_confidence", n_jobs=1)
    rows = np.asarray(rows, dtype=np.int64)
    if multilabel:  # quality: how well the given set agrees with the codes, class by class (the worst class)
        agreement = np.where(y[rows] == 1, probabilities[rows], 1 - probabilities[rows])
        return LabelIssues(rows, (probabilities[rows] >= 0.5).astype(np.int64), agreement.min(axis=1, initial=1.0), C, len(y))
    quality = probabilities[rows, y[rows]] if len(rows) else np.zeros(0)
    return LabelIssues(rows, probabilities[rows].argmax(axis=1) if len(rows) else rows, quality, C, len(y))
