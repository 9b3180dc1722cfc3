"""``tlpipe evaluate``: a saved bundle scored on labelled images, any subset of its classes, with the
metrics, their intervals and (``--plots``) the reliability diagram and confusion matrix."""
from __future__ import annotations

import unicodedata

from pathlib import Path
from typing import Sequence

import numpy as np

from tlpipe.bundle.folder import Bundle
from tlpipe.data.dataset import DatasetSpec, Sample
from tlpipe.data.images import content_hashes
from tlpipe.data.scan import WHOLE_FOLDER
from tlpipe.data.source import as_source
from tlpipe.data.table import LabelTable
from tlpipe.errors import TlpipeError
from tlpipe.run.folder import RunFolder

EVALUATION_PLOTS = (RunFolder.RELIABILITY, RunFolder.CONFUSION_MATRIX, RunFolder.PR_CURVES)  # evaluate --plots, named as a fit's


def evaluate_bundle(bundle: Bundle, data: str | Path | LabelTable, split: str | None = None, batch_size: int = 64,
                    workers: int | None = None, plots: Path | None = None) -> dict:
    """Metrics of ``bundle`` on one split of a labelled folder (or table: a table without a split
    column is scored whole): by default test/, else val/, else
    train/, else the whole of a flat class-per-folder (split ``WHOLE_FOLDER``). Classes are matched
    by name, so the split may hold any subset of the bundle's classes, even one; an unknown class
    is an error, since the bundle could never predict it."""
    from tlpipe.data import prepare_dataset

    spec = prepare_dataset(data, evaluation=True)
    source = as_source(data)
    table, shown = isinstance(source, LabelTable), source.path
    if WHOLE_FOLDER in spec.splits and split is not None:
        raise TlpipeError(f"{shown} has no train/ val/ test/ {'split column' if table else 'folders'}: drop --split to "
                          "score all of its images")
    split = split or next((s for s in ("test", "val", "train", WHOLE_FOLDER) if s in spec.splits), None)
    if split is not None and split not in spec.splits:
        raise TlpipeError(f"{shown} has no {split}/ split with images (found: {', '.join(spec.splits)}): use --split")
    samples = spec.splits.get(split, [])
    if not samples:  # every image file there failed the check
        where = f"{split}/ of {shown}" if split not in (None, WHOLE_FOLDER) else str(shown)
        raise TlpipeError(f"no image to score in {where}: every image file there failed the check (unreadable, "
                          "or not an image); add images that open")
    kind = f"{'label' if table else 'class folder'}(s)"
    return score_split(bundle, spec, split, batch_size=batch_size, workers=workers, plots=plots, kind=kind, shown=shown)


def score_split(bundle: Bundle, spec: DatasetSpec, split: str, *, batch_size: int = 64, workers: int | None = None,
                plots: Path | None = None, kind: str = "class folder(s)", shown: str | Path | None = None) -> dict:
    """Metrics of ``bundle`` on the checked ``spec``'s ``split`` (a fit scores its test/ this way,
    once, at the end), with how many of its images the fit trained on or selected with."""
    samples = spec.splits[split]
    y_true = _truth(bundle, spec, samples, kind, shown or spec.root)
    codes = bundle.codes([s.path for s in samples], batch_size, workers)
    probabilities = bundle.head.predict_proba(codes)
    scored = {"split": split, "data": str(spec.root), "n_images": len(samples), "quarantined": len(spec.quarantined),
              **_seen_by_fit(bundle, samples, split), **_unknowns(bundle, codes)}
    if bundle.head.multilabel:
        from tlpipe.bundle.metrics import multilabel_metrics, save_pr_curves

        metrics = multilabel_metrics(y_true, probabilities, bundle.head.thresholds, bundle.classes)
        if plots is not None:
            save_pr_curves(y_true, probabilities, bundle.classes, Path(plots) / RunFolder.PR_CURVES)
        return {**scored, **metrics}
    from tlpipe.bundle.metrics import evaluation_metrics

    metrics = evaluation_metrics(y_true, probabilities, bundle.classes)
    if plots is not None:  # the reliability diagram and the row-normalized confusion matrix of this split
        from tlpipe.bundle.metrics import save_confusion_matrix, save_reliability_diagram

        save_reliability_diagram(probabilities, y_true, Path(plots) / EVALUATION_PLOTS[0], title=f"Reliability ({split})")
        save_confusion_matrix(metrics["confusion_matrix"], bundle.classes, Path(plots) / EVALUATION_PLOTS[1],
                              normalize=True, title=f"Confusion matrix ({split}, rows sum to 1)")
    return {**scored, **metrics}


def _seen_by_fit(bundle: Bundle, samples: Sequence[Sample], split: str) -> dict:
    """How many of the scored images (by content, whatever their names) the fit trained on or chose its
    settings with, and the warning when any: such scores flatter the model."""
    seen = bundle.fit_images()
    if seen is None:
        return {"seen_by_fit": None, "warnings": ["the bundle records no fit images (an earlier tlpipe wrote it): "
                                                  "whether the fit saw these images is not known"]}
    hashes = [bytes.fromhex(h) for h in content_hashes([s.path for s in samples])]
    counts = {name: sum(h in seen[name] for h in hashes) for name in seen}
    used = [f"{n} were {'trained on' if name == 'train' else 'the val split that chose its settings'}"
            for name, n in counts.items() if n]
    if not used:
        return {"seen_by_fit": counts, "warnings": []}
    return {"seen_by_fit": counts, "warnings": [
        f"of the {len(samples)} images scored ({split}), {' and '.join(used)}: these scores flatter the model; "
        "score labelled images the fit never saw (a test/ split)"]}


def _unknowns(bundle: Bundle, codes: np.ndarray) -> dict:
    """The share of these labelled images the bundle would answer ``unknown`` (its false rejections:
    every one is of a class it knows); the metrics score every image regardless."""
    scored = bundle.unknown_scores(codes)
    return {} if scored is None else {"unknown_rejected": float(scored[1].mean()),
                                      "unknown_false_rejection_target": bundle.unknowns.false_rejection}


def _truth(bundle: Bundle, spec, samples, kind: str, shown) -> np.ndarray:
    """The samples' classes as the bundle numbers them: indices, or for a multi-label bundle a 0/1
    matrix (a single-label folder or table is a set of one). Classes the bundle does not know, or
    label sets for a single-label bundle, are one line."""
    named = [[c for c, on in zip(spec.classes, s.label) if on] if spec.multilabel else [spec.classes[s.label]]
             for s in samples]
    names = [[unicodedata.normalize("NFC", n) for n in row] for row in named]  # a macOS folder's café is NFD
    unknown = sorted({n for row in names for n in row} - {unicodedata.normalize("NFC", c) for c in bundle.classes})
    if unknown:
        raise TlpipeError(f"{shown} has {kind} {listed(unknown)} that the bundle does not know; it knows: "
                          f"{listed(bundle.classes)}")
    if spec.multilabel and not bundle.head.multilabel:
        raise TlpipeError(f"{shown} gives images several labels, but the bundle predicts one class an image: score it "
                          "on single-label data, or fit a multi-label model")
    to_bundle = {unicodedata.normalize("NFC", name): i for i, name in enumerate(bundle.classes)}
    if not bundle.head.multilabel:
        return np.array([to_bundle[row[0]] for row in names])
    truth = np.zeros((len(samples), len(bundle.classes)), np.int64)
    for i, row in enumerate(names):
        truth[i, [to_bundle[n] for n in row]] = 1
    return truth


def listed(names: Sequence[str], cap: int = 12) -> str:
    """Names for one line of an error: the first ``cap``, then how many more."""
    more = f" and {len(names) - cap} more" if len(names) > cap else ""
    return ", ".join(names[:cap]) + more
