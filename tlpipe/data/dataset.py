"""From a folder to a checked, split ``DatasetSpec`` that the rest of the pipeline trusts.

Every image is decoded once by the check; bad files are quarantined (listed with the reason,
never touched) and the fit goes on. The dataset folder is only ever read.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from tlpipe.cache import fingerprint
from tlpipe.data.images import check_image, content_hashes
from tlpipe.data.scan import ScannedFiles
from tlpipe.data.source import DataSource, as_source
from tlpipe.errors import TlpipeError
from tlpipe.progress import progress_bar
from tlpipe.run.folder import RunFolder
from tlpipe.utils import atomic_write, default_workers

QUARANTINE_REPORT = RunFolder.QUARANTINE


@dataclass(frozen=True)
class Sample:
    """An image and its target: a class index, or for a multi-label set a 0/1 tuple over the classes."""

    path: Path
    label: int | tuple[int, ...]

    @property
    def target(self) -> int | torch.Tensor:
        """The label as a loader yields it: batches of multi-label targets stack to (batch, classes)."""
        return torch.tensor(self.label) if isinstance(self.label, tuple) else self.label


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
    multilabel: bool = False  # each image has a set of classes (``Sample.label`` a 0/1 tuple)

    def counts(self) -> dict[str, int]:
        return {split: len(samples) for split, samples in self.splits.items()}

    @cached_property
    def identity(self) -> str:
        """sha256 of the train and val files (path, size, modification time, label: ``fingerprint``):
        what a fit's study, plan and checkpoints are of, so that an edited, relabelled, added or
        removed image starts them anew, and two datasets never share a study. Read once a spec (a
        stat of every file): one fit asks it for every trial."""
        files = fingerprint(self.splits["train"] + self.splits.get("val", []))
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()

    @cached_property
    def fit_image_hashes(self) -> dict[str, list[str]]:
        """The content hashes (``content_hashes``) of the train and val images, by split: what a bundle
        keeps so that ``evaluate`` can tell a score on the images a fit learned and chose on from an
        honest one. Read once a spec (every file's bytes): a fine-tune records twice."""
        return {split: content_hashes([s.path for s in self.splits.get(split, [])]) for split in ("train", "val")}

    def class_counts(self, split: str = "train") -> dict[str, int]:
        """Images of each class in ``split`` (multi-label: images that have it)."""
        return dict(zip(self.classes, map(int, label_counts(self.labels(split), len(self.classes)))))

    def labels(self, split: str) -> np.ndarray:
        """The split's targets: class indices (N,), or a 0/1 matrix (N, classes) for a multi-label set."""
        samples = self.splits[split]
        shape = (len(samples), len(self.classes)) if self.multilabel else (len(samples),)
        return np.array([s.label for s in samples], dtype=np.int64).reshape(shape)

    def relative(self, path: Path) -> str:
        """``path`` as the user wrote it under the root (a table's row may name one outside it)."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else path.as_posix()


def label_counts(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Images of each class: the counts of class indices, or a 0/1 matrix's column sums (multi-label)."""
    return labels.sum(axis=0) if labels.ndim == 2 else np.bincount(labels, minlength=n_classes)


def stratified_subset(labels: np.ndarray, max_images: int | None, seed: int, least: int = 1) -> np.ndarray:
    """Sorted rows to use: all, or a seeded ``max_images`` with the class proportions kept, each
    class's first ``least`` images (or all it has) in before any other when ``max_images`` allows
    (a multi-label 0/1 matrix: a seeded random ``max_images``): the first rows of ``stratified_order``,
    so a larger subset holds a smaller one's rows."""
    if max_images is None or max_images >= len(labels):
        return np.arange(len(labels))
    return np.sort(stratified_order(labels, seed, least)[:max_images])


def stratified_order(labels: np.ndarray, seed: int, least: int = 1) -> np.ndarray:
    """Every row in a seeded order whose every prefix keeps the class proportions (after each class's
    first ``least`` images, which come before all others): a pass over the images in this order can
    stop anywhere and leave a stratified sample. A multi-label 0/1 matrix: a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if labels.ndim == 2:
        return order
    rank = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = (np.arange(len(members)) + 0.5) / len(members)  # taking low ranks first keeps proportions
        rank[members[:least]] = 0.0  # the floor of every class before any image past it: no class left out
    return np.argsort(rank, kind="stable")


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
    root: str | Path | DataSource, val_fraction: float = 0.2, seed: int = 0, report_dir: Path | None = None,
    hold_out: bool = True, evaluation: bool = False,
) -> DatasetSpec:
    """Scan, check and split ``root``. Without a val/ folder, a stratified seeded ``val_fraction``
    of train is held out (unless ``hold_out`` is False). Writes the quarantine report to
    ``report_dir`` when given, before raising for a class left without images, so the user can
    see which files failed. ``evaluation``: labelled images to score a model on, with none of the
    training rules (see ``scan_folder``) and nothing held out."""
    scanned = as_source(root).scan(evaluation)
    paths = [p for per_class in scanned.files.values() for ps in per_class.values() for p in ps if p not in scanned.rejected]
    bad = {**check_files(paths), **scanned.rejected}  # a rejected row's file is never read (it may lie outside the root)
    checked = DatasetSpec(root=scanned.root, classes=scanned.classes, splits={},
                          val_from="folder" if "val" in scanned.files else "split",
                          quarantined=sorted(bad.items()), skipped=scanned.skipped, multilabel=scanned.multilabel)
    if report_dir is not None:
        write_quarantine_report(checked, report_dir)
    splits = _checked_samples(scanned, bad, evaluation)
    if hold_out and not evaluation and "val" not in splits:
        held_out = _multilabel_split if scanned.multilabel else _stratified_split
        splits["train"], splits["val"] = held_out(splits["train"], scanned.classes, val_fraction, seed)
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
    splits = {split: _samples(per_class, label_of, bad, scanned.multilabel) for split, per_class in scanned.files.items()}
    if evaluation:
        return splits
    train_counts = label_counts(np.array([s.label for s in splits["train"]], dtype=np.int64), len(scanned.classes))
    for name in scanned.classes:
        if train_counts[label_of[name]] == 0:
            n_bad = sum(1 for p in scanned.files["train"].get(name, []) if p in bad)
            detail = f"its {n_bad} file(s) failed the check (see {QUARANTINE_REPORT})" if n_bad else "it has no image files"
            if not n_bad and scanned.skipped:  # e.g. every image a link out of the dataset (git-annex, DVC): say so
                detail += f" (skipped in the dataset: {', '.join(f'{n} {why}' for why, n in sorted(scanned.skipped.items()))})"
            raise TlpipeError(f"class '{name}' has no valid training image: {detail}; add images or remove the folder")
    return splits


def _samples(per_class: dict[str, list[Path]], label_of: dict[str, int], bad: dict[Path, str],
             multilabel: bool) -> list[Sample]:
    """One split's valid images: one sample per file, its class index, or (multi-label) the 0/1
    tuple of every class it is listed under, in path order."""
    if not multilabel:
        return [Sample(p, label_of[c]) for c, paths in per_class.items() for p in paths if p not in bad]
    classes_of: dict[Path, set[int]] = {}
    for c, paths in per_class.items():
        for p in paths:
            classes_of.setdefault(p, set()).add(label_of[c])
    return [Sample(p, tuple(int(i in found) for i in range(len(label_of))))
            for p, found in sorted(classes_of.items()) if p not in bad]


def _stratified_split(samples: list[Sample], classes: list[str], val_fraction: float,
                      seed: int) -> tuple[list[Sample], list[Sample]]:
    from sklearn.model_selection import train_test_split  # here, not at the top: predicting splits nothing

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
    for source, target in ((train, val), (val, train)):  # its rounding can leave a class of 2-3 images out of val
        for label in sorted({s.label for s in source} - {s.label for s in target}):  # (or, at a large fraction, train)
            moved = next(s for s in source if s.label == label)  # the first in the split's shuffled order
            source.remove(moved)
            target.append(moved)
    key = lambda s: (s.label, str(s.path))  # noqa: E731 - deterministic order for the same seed
    return sorted(train, key=key), sorted(val, key=key)


def _multilabel_split(samples: list[Sample], classes: list[str], val_fraction: float,
                      seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded ``val_fraction`` held out by iterative stratification (Sechidis et al., 2011;
    ``iterative-stratification``), which keeps every label's share on both sides as far as its
    images allow: a plain random split can leave a rare label out of val, or out of train."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    labels = np.array([s.label for s in samples])
    if len(samples) < 4:
        raise TlpipeError(f"{len(samples)} images are too few to hold out a validation split: add images or give "
                          "a split column with val rows")
    split = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=max(1, math.ceil(val_fraction * len(samples))),
                                             random_state=seed)
    train, val = next(split.split(np.zeros(len(samples)), labels))
    return [samples[i] for i in sorted(train)], [samples[i] for i in sorted(val)]
