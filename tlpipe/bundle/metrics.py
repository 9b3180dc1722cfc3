"""Validation metrics (scikit-learn) and the confusion-matrix figure."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from tlpipe.utils import atomic_write


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, macro F1 (over the classes the images hold: one absent from the folder has no F1),
    per-class precision/recall/F1/support and the confusion matrix."""
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f1[support > 0])),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray, axis: int = -1) -> np.ndarray:
    """scikit-learn's ``f1_score(average="macro", labels=labels, zero_division=0)`` along ``axis``
    for stacked resamples at once (the bootstrap's 1000 calls of it took 4 s on 8 images), each
    averaged over the ``labels`` its own true labels hold: a resample that drew no image of a rare
    class does not score it 0 (which biased the interval low: [0.8, 1.0] for a perfect model)."""
    y_true, y_pred = np.moveaxis(y_true, axis, -1), np.moveaxis(y_pred, axis, -1)
    shape, width = y_true.shape[:-1], int(max(y_true.max(), y_pred.max(), np.max(labels))) + 1
    rows = np.arange(int(np.prod(shape)))[:, None] * width  # each resample's own bins

    def counts(bins: np.ndarray) -> np.ndarray:
        return np.bincount(bins, minlength=len(rows) * width).reshape(*shape, width)[..., labels]

    true, pred = rows + y_true.reshape(len(rows), -1), rows + y_pred.reshape(len(rows), -1)
    truth = counts(true.ravel())
    both, either = counts(true[true == pred]), truth + counts(pred.ravel())
    f1, held = np.divide(2 * both, either, out=np.zeros(both.shape), where=either > 0), truth > 0
    return (f1 * held).sum(axis=-1) / np.maximum(held.sum(axis=-1), 1)


def evaluation_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], seed: int = 0) -> dict:
    """``classification_metrics`` of the top class, and what says how far to trust them: accuracy
    with its Wilson 95% interval, balanced accuracy, macro F1 with a bootstrap 95% interval, top-k
    accuracy, negative log-likelihood, Brier score, expected calibration error (15 bins), and the
    most confused pairs (true -> predicted, by count)."""
    from scipy.stats import binomtest, bootstrap
    from sklearn.metrics import log_loss, top_k_accuracy_score

    from tlpipe.bundle.calibration import expected_calibration_error

    y_pred = probabilities.argmax(axis=1)
    metrics = classification_metrics(y_true, y_pred, classes)
    n, correct, present = len(y_true), int((y_pred == y_true).sum()), np.unique(y_true)
    wilson = binomtest(correct, n).proportion_ci(CONFIDENCE, method="wilson")
    f1_interval = bootstrap((y_true, y_pred), lambda t, p, axis: macro_f1(t, p, present, axis), paired=True,
                            vectorized=True, batch=max(1, 2_000_000 // n), n_resamples=BOOTSTRAP_RESAMPLES,
                            confidence_level=CONFIDENCE, method="percentile", random_state=seed).confidence_interval \
        if n > 1 else None  # one image: no resampling to do
    labels = np.arange(len(classes))
    k = min(5, len(classes) - 1)
    matrix = np.array(metrics["confusion_matrix"])
    # Recall averaged over the classes present: balanced_accuracy_score, without its warnings when one is absent
    balanced = float(np.mean(np.diag(matrix)[present] / matrix.sum(axis=1)[present]))
    np.fill_diagonal(matrix, 0)
    pairs = sorted(((int(matrix[i, j]), i, j) for i, j in zip(*np.nonzero(matrix))), reverse=True)[:5]
    return {
        **metrics,
        "accuracy_ci": [float(wilson.low), float(wilson.high)],
        "balanced_accuracy": balanced,
        "macro_f1_ci": [float(f1_interval.low), float(f1_interval.high)] if f1_interval else [0.0, 1.0],
        **({f"top_{k}_accuracy": float(top_k_accuracy_score(y_true, probabilities, k=k, labels=labels))} if k > 1 else {}),
        "nll": float(log_loss(y_true, probabilities, labels=labels)),
        "brier": float(np.mean(np.sum((probabilities - np.eye(len(classes))[y_true]) ** 2, axis=1))),
        "ece": expected_calibration_error(probabilities, y_true),
        "most_confused": [{"true": classes[i], "predicted": classes[j], "count": c} for c, i, j in pairs],
    }


def _ranked_precision(scores: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision of one class under each row of ``weights`` (images' counts in a bootstrap
    resample; a row of ones is the plain figure, scikit-learn's ``average_precision_score``, ties
    included): sum over positives of the precision at their score, weighted, over the positives' weight."""
    order = np.argsort(-scores, kind="stable")
    ranked, hits, w = scores[order], y[order].astype(np.float64), weights[:, order].astype(np.float64)
    ends = np.r_[np.nonzero(np.diff(ranked))[0], len(ranked) - 1]  # the last image of each run of equal scores
    group_end = ends[np.searchsorted(ends, np.arange(len(ranked)))]
    true_positives, seen = np.cumsum(w * hits, axis=1), np.cumsum(w, axis=1)
    precision = true_positives[:, group_end] / np.maximum(seen[:, group_end], 1e-12)
    positives = (w * hits).sum(axis=1)
    return np.divide((w * hits * precision).sum(axis=1), positives, out=np.zeros(len(w)), where=positives > 0)


def multilabel_metrics(Y: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray, classes: Sequence[str],
                       seed: int = 0) -> dict:
    """A multi-label model's figures on (``Y``, ``probabilities``) with its ``thresholds``: mean
    average precision (over the classes with a positive), micro and macro F1, subset accuracy (every
    class right), Hamming loss, and per class its AP, precision, recall, F1, support and threshold;
    the mAP, micro F1 and each AP with a bootstrap 95% interval (resampling images, percentile)."""
    Y, predicted = Y.astype(np.int64), (probabilities >= thresholds).astype(np.int64)
    present = Y.sum(axis=0) > 0
    precision, recall, f1, support = precision_recall_fscore_support(Y, predicted, zero_division=0)
    resamples = np.vstack([np.ones(len(Y), np.int64), np.random.default_rng(seed).multinomial(
        len(Y), np.full(len(Y), 1 / len(Y)), size=BOOTSTRAP_RESAMPLES)])  # row 0: the images as they are
    ap = np.stack([_ranked_precision(probabilities[:, j], Y[:, j], resamples) for j in range(Y.shape[1])], axis=1)
    held = (resamples @ Y) > 0  # each resample's classes with a positive: one that drew none is not scored 0
    mean_ap = (ap * held).sum(axis=1) / np.maximum(held.sum(axis=1), 1)
    counts = {name: resamples @ values.sum(axis=1) for name, values in
              (("tp", predicted & Y), ("fp", predicted & (1 - Y)), ("fn", (1 - predicted) & Y))}
    micro = np.divide(2 * counts["tp"], 2 * counts["tp"] + counts["fp"] + counts["fn"],
                      out=np.zeros(len(resamples)), where=(2 * counts["tp"] + counts["fp"] + counts["fn"]) > 0)
    interval = lambda values: [float(v) for v in np.quantile(values[1:], [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])]  # noqa: E731
    per_class = {name: {"average_precision": float(ap[0, j]), "average_precision_ci": interval(ap[held[:, j], j]) if present[j] else [0.0, 0.0],
                        "precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                        "support": int(support[j]), "threshold": float(thresholds[j])}
                 for j, name in enumerate(classes)}
    return {
        "task": "multilabel",
        "mean_average_precision": float(mean_ap[0]), "mean_average_precision_ci": interval(mean_ap),
        "micro_f1": float(micro[0]), "micro_f1_ci": interval(micro),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "subset_accuracy": float((predicted == Y).all(axis=1).mean()),
        "hamming_loss": float((predicted != Y).mean()),
        "per_class": per_class,
        "worst_classes": sorted((c for c, row in per_class.items() if row["support"]),
                                key=lambda c: per_class[c]["average_precision"])[:5],
    }


def headline(metrics: dict) -> tuple[str, float]:
    """The one figure a fit is summed up by: (``val_accuracy``, accuracy), multi-label (``val_map``, mAP)."""
    if metrics.get("task") == "multilabel":
        return "val_map", metrics["mean_average_precision"]
    return "val_accuracy", metrics["accuracy"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _drawable(names: Sequence[str]) -> list[str]:
    """Class names as the plots' font can draw them: a character it has no glyph for (an emoji or
    a CJK ideograph in DejaVu Sans) is written in brackets as its Unicode name when short ("[ANT]"),
    else its code point ("[U+65E5]"), not as an empty box."""
    import unicodedata

    import matplotlib

    glyphs = _font_characters(tuple(matplotlib.rcParams["font.family"]), tuple(matplotlib.rcParams["font.sans-serif"]))

    def shown(c: str) -> str:
        if ord(c) in glyphs or not c.isprintable():
            return c
        name = unicodedata.name(c, "")
        return f"[{name}]" if 0 < len(name) <= 20 else f"[U+{ord(c):04X}]"

    return ["".join(map(shown, name)) for name in names]


@functools.lru_cache(maxsize=4)
def _font_characters(families: tuple[str, ...], sans: tuple[str, ...]) -> frozenset[int]:
    """The code points some font of the plots' ``families`` has a glyph for (each falls back on the
    next, as matplotlib draws). ``sans``, the fonts "sans-serif" stands for, is only part of the cache
    key: a change to either rc setting is seen."""
    from matplotlib.font_manager import FontProperties, findfont, get_font

    characters: set[int] = set()
    for family in families:
        try:
            characters.update(get_font(findfont(FontProperties(family=family), fallback_to_default=False)).get_charmap())
        except ValueError:  # a family named but not installed
            continue
    return frozenset(characters) or frozenset(get_font(findfont(FontProperties())).get_charmap())


def save_learning_curves(history: list[dict], path: Path, score: str = "accuracy") -> Path:
    """Train/val loss and the val score (accuracy; mAP for a multi-label set) per epoch."""
    plt = _pyplot()
    epochs = range(1, len(history) + 1)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], label="val")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], marker="o")
    acc_ax.set(xlabel="epoch", ylabel=score, title=f"Validation {score}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def save_data_curve(curve: dict, path: Path) -> Path:
    """Does more data pay, drawn: the val score at each train size measured (``LearningCurve.to_dict``),
    and the power law's forecasts with their 95% intervals, on a log axis of train images."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve["sizes"], curve["val_score"], marker="o", label="measured")
    forecasts = sorted(curve["predicted"].values(), key=lambda f: f["images"])
    x, y = [f["images"] for f in forecasts], [f["score"] for f in forecasts]
    ax.errorbar(x, y, yerr=[[s - f["low"] for s, f in zip(y, forecasts)], [f["high"] - s for s, f in zip(y, forecasts)]],
                fmt="s", capsize=4, label="forecast (95%)")
    ax.plot([curve["sizes"][-1], *x], [curve["val_score"][-1], *y], linestyle=":", color="grey")
    ax.set(xscale="log", xlabel="train images", ylabel=f"val {curve['metric']}", title="Would more data pay?")
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def save_confusion_matrix(matrix: list[list[int]], classes: Sequence[str], path: Path, normalize: bool = False,
                          title: str = "Validation confusion matrix") -> Path:
    """The matrix as a figure; ``normalize``: each row as shares of its true class (a class absent
    from the images keeps a row of zeros)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix, dtype=np.float64 if normalize else np.int64)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    plt = _pyplot()
    many = len(classes) > 30  # counts in every cell and a label per class stop being legible (and cost minutes)
    size = min(20.0, max(4.0, 0.6 * len(classes) + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=None if many else _drawable(classes)).plot(
        ax=ax, cmap="Blues", colorbar=many, xticks_rotation=45, include_values=not many, values_format=".2f" if normalize else None
    )
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
    plt.close(fig)
    return path


def save_pr_curves(Y: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """A multi-label model's precision-recall curve per class (with its AP), on one axis."""
    from sklearn.metrics import PrecisionRecallDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for j, name in enumerate(_drawable(classes)):
        if Y[:, j].any():
            PrecisionRecallDisplay.from_predictions(Y[:, j], probabilities[:, j], name=name, ax=ax)
    ax.set(title="Precision-recall per class (validation)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def save_reliability_diagram(probabilities: np.ndarray, y_true: np.ndarray, path: Path, bins: int = 15,
                             title: str = "Reliability (validation)") -> Path:
    """Accuracy against confidence of the top class, per equal-width bin (the ECE's bins), with the
    share of images in each bin below: a calibrated model sits on the diagonal."""
    from tlpipe.bundle.calibration import confidence_bins

    plt = _pyplot()
    which, confidence, correct = confidence_bins(probabilities, y_true, bins)
    centres = (np.arange(bins) + 0.5) / bins
    shown = [b for b in range(bins) if (which == b).any()]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    top.bar(centres[shown], [correct[which == b].mean() for b in shown], width=1 / bins, edgecolor="black", label="accuracy")
    top.set(ylabel="accuracy", title=title, xlim=(0, 1), ylim=(0, 1))
    top.legend(loc="upper left")
    bottom.bar(centres[shown], [(which == b).mean() for b in shown], width=1 / bins, color="grey")
    bottom.set(xlabel="confidence of the predicted class", ylabel="share")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path
