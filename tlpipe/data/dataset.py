"""From a folder to a checked, split ``DatasetSpec`` that the rest of the pipeline trusts.

Every image is decoded once by the check; bad files are quarantined (listed with the reason,
never touched) and the fit goes on. The dataset folder is only ever read.
"""
from __future__ import annotations

import csv
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from tlpipe.data.images import check_image
from tlpipe.data.scan import ScannedFiles, scan_folder
from tlpipe.data.table import LabelTable, as_source, scan_table
from tlpipe.errors import TlpipeError
from tlpipe.progress import progress_bar
from tlpipe.run.folder import RunFolder
from tlpipe.utils import atomic_write, default_workers

QUARANTINE_REPORT = RunFolder.QUARANTINE


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetSpec:
    """A checked dataset: classes, samples per split, and what was left out and why."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]  # "train", "val", and "test" when the folder has one
    val_from: str  # "folder" (a val/ folder) or "split" (held out from train)
    quarantined: list[tuple[Path, str]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)  # what the user should know about the data (one line each)

    def counts(self) -> dict[str, int]:
        return {split: len(samples) for split, samples in self.splits.items()}

    def class_counts(self, split: str = "train") -> dict[str, int]:
        counts = Counter(s.label for s in self.splits[split])
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def relative(self, path: Path) -> str:
        """``path`` as the user wrote it under the root (a table's row may name one outside it)."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else path.as_posix()


def stratified_subset(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Sorted rows to use: all, or a seeded ``max_images`` with the class proportions kept."""
    if max_images is None or max_images >= len(labels):
        return np.arange(len(labels))
    order, rank = np.random.default_rng(seed).permutation(len(labels)), np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)  # taking low ranks first keeps proportions
    return np.sort(np.argsort(rank, kind="stable")[:max_images])


def check_files(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    """Decode every file once (threads: Pillow releases the GIL); return the bad ones with why."""
    workers = max(1, default_workers(workers))
    pool = ThreadPoolExecutor(workers)
    try:
        with progress_bar("Checking images", len(paths)) as advance:
            reasons = {}
            for path, reason in zip(paths, pool.map(check_image, paths)):
                advance()
                if reason:
                    reasons[path] = reason
    finally:  # a stopped fit (Ctrl+C, SIGTERM) does not wait for the files not yet checked
        pool.shutdown(cancel_futures=True)
    return reasons


def write_quarantine_report(spec: DatasetSpec, out_dir: Path) -> Path:
    """``quarantine.csv``: one row per file left out, with the reason (header only when none)."""
    def write(f):
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        for path, reason in spec.quarantined:
            writer.writerow([spec.relative(path), reason])

    return atomic_write(out_dir / QUARANTINE_REPORT, write, mode="w", newline="")


def prepare_dataset(
    root: str | Path, val_fraction: float = 0.2, seed: int = 0, report_dir: Path | None = None,
    hold_out: bool = True, evaluation: bool = False,
) -> DatasetSpec:
    """Scan, check and split ``root``. Without a val/ folder, a stratified seeded ``val_fraction``
    of train is held out (unless ``hold_out`` is False). Writes the quarantine report to
    ``report_dir`` when given, before raising for a class left without images, so the user can
    see which files failed. ``evaluation``: labelled images to score a model on, with none of the
    training rules (see ``scan_folder``) and nothing held out."""
    source = as_source(root)
    scanned = scan_table(source, evaluation) if isinstance(source, LabelTable) else scan_folder(source, evaluation)
    paths = [p for per_class in scanned.files.values() for ps in per_class.values() for p in ps if p not in scanned.rejected]
    bad = {**check_files(paths), **scanned.rejected}  # a rejected row's file is never read (it may lie outside the root)
    checked = DatasetSpec(root=scanned.root, classes=scanned.classes, splits={},
                          val_from="folder" if "val" in scanned.files else "split",
                          quarantined=sorted(bad.items()), skipped=scanned.skipped)
    if report_dir is not None:
        write_quarantine_report(checked, report_dir)
    splits = _checked_samples(scanned, bad, evaluation)
    if hold_out and not evaluation and "val" not in splits:
        splits["train"], splits["val"] = _stratified_split(splits["train"], scanned.classes, val_fraction, seed)
    spec = replace(checked, splits=splits)
    if spec.val_from == "folder" and not evaluation:  # the note is about a fit's model choices
        missing = [name for name, n in spec.class_counts("val").items() if n == 0]
        if missing:
            return replace(spec, notes=[
                f"class(es) {', '.join(repr(m) for m in missing)} have no image in val/: their validation figures "
                "are missing and model choices ignore them; add images to val/<class>"])
    return spec


def _checked_samples(scanned: ScannedFiles, bad: dict[Path, str], evaluation: bool) -> dict[str, list[Sample]]:
    """The valid images of each split; for training, every class must keep one in train/."""
    label_of = {name: i for i, name in enumerate(scanned.classes)}
    splits = {
        split: [Sample(p, label_of[c]) for c, paths in per_class.items() for p in paths if p not in bad]
        for split, per_class in scanned.files.items()
    }
    if evaluation:
        return splits
    train_counts = Counter(s.label for s in splits["train"])
    for name in scanned.classes:
        if train_counts[label_of[name]] == 0:
            n_bad = sum(1 for p in scanned.files["train"].get(name, []) if p in bad)
            detail = f"its {n_bad} file(s) failed the check (see {QUARANTINE_REPORT})" if n_bad else "it has no image files"
            raise TlpipeError(f"class '{name}' has no valid training image: {detail}; add images or remove the folder")
    return splits


def _stratified_split(samples: list[Sample], classes: list[str], val_fraction: float,
                      seed: int) -> tuple[list[Sample], list[Sample]]:
    counts = Counter(s.label for s in samples)
    for label, n in sorted(counts.items()):
        if n < 2:
            raise TlpipeError(
                f"class '{classes[label]}' has only {n} valid image: holding out a validation split "
                "needs at least 2 per class; add images or give a val/ folder"
            )
    n_classes = len(counts)
    n_val = max(n_classes, math.ceil(val_fraction * len(samples)))
    if len(samples) - n_val < n_classes:
        raise TlpipeError(
            f"{len(samples)} images are too few to hold out a validation split for {n_classes} classes: "
            "add images or give a val/ folder"
        )
    train, val = train_test_split(
        samples, test_size=n_val, stratify=[s.label for s in samples], random_state=seed
    )
    key = lambda s: (s.label, str(s.path))  # noqa: E731 - deterministic order for the same seed
    return sorted(train, key=key), sorted(val, key=key)
