"""``tlpipe evaluate``: a saved bundle scored on labelled images, any subset of its classes, with the
metrics, their intervals and (``--plots``) the reliability diagram and confusion matrix."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tlpipe.bundle.folder import Bundle
from tlpipe.data.scan import WHOLE_FOLDER
from tlpipe.data.table import LabelTable, as_source, source_path
from tlpipe.errors import TlpipeError
from tlpipe.run.folder import RunFolder

EVALUATION_PLOTS = (RunFolder.RELIABILITY, RunFolder.CONFUSION_MATRIX)  # what evaluate --plots writes, named as a fit's


def evaluate_bundle(bundle: Bundle, data: str | Path | LabelTable, split: str | None = None, batch_size: int = 64,
                    workers: int | None = None, plots: Path | None = None) -> dict:
    """Metrics of ``bundle`` on one split of a labelled folder (or table: a table without a split
    column is scored whole): by default test/, else val/, else
    train/, else the whole of a flat class-per-folder (split ``WHOLE_FOLDER``). Classes are matched
    by name, so the split may hold any subset of the bundle's classes, even one; an unknown class
    is an error, since the bundle could never predict it."""
    from tlpipe.data import prepare_dataset
    from tlpipe.bundle.metrics import evaluation_metrics

    spec = prepare_dataset(data, evaluation=True)
    source = as_source(data)
    table, shown = isinstance(source, LabelTable), source_path(source)
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
    unknown = sorted({spec.classes[s.label] for s in samples} - set(bundle.classes))
    if unknown:
        raise TlpipeError(f"{shown} has {'label' if table else 'class folder'}(s) {listed(unknown)} that the bundle "
                          f"does not know; it knows: {listed(bundle.classes)}")
    to_bundle = {name: i for i, name in enumerate(bundle.classes)}
    y_true = np.array([to_bundle[spec.classes[s.label]] for s in samples])
    probabilities = bundle.head.predict_proba(bundle.codes([s.path for s in samples], batch_size, workers))
    metrics = evaluation_metrics(y_true, probabilities, bundle.classes)
    if plots is not None:  # the reliability diagram and the row-normalized confusion matrix of this split
        from tlpipe.bundle.metrics import save_confusion_matrix, save_reliability_diagram

        save_reliability_diagram(probabilities, y_true, Path(plots) / EVALUATION_PLOTS[0], title=f"Reliability ({split})")
        save_confusion_matrix(metrics["confusion_matrix"], bundle.classes, Path(plots) / EVALUATION_PLOTS[1],
                              normalize=True, title=f"Confusion matrix ({split}, rows sum to 1)")
    return {"split": split, "data": str(spec.root), "n_images": len(samples), "quarantined": len(spec.quarantined), **metrics}


def listed(names: Sequence[str], cap: int = 12) -> str:
    """Names for one line of an error: the first ``cap``, then how many more."""
    more = f" and {len(names) - cap} more" if len(names) > cap else ""
    return ", ".join(names[:cap]) + more
