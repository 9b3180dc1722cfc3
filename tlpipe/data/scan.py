"""Finding the images of a folder-per-class dataset, with or without train/ val/ test/ above them.

Only reads the folder. Every layout problem is a ``TlpipeError`` naming the folder and the fix.
"""
from __future__ import annotations

import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tlpipe.data.images import check_image, is_image_name
from tlpipe.errors import TlpipeError

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
WHOLE_FOLDER = "all images"  # the split of a flat folder scored by evaluate (no train/ val/ test/)
LAYOUT_HINT = "expected one subfolder per class (data/cats/*.jpg, data/dogs/*.jpg), optionally under train/ val/ test/"


@dataclass
class ScannedFiles:
    """Image files per split and class name, before any is decoded."""

    root: Path
    classes: list[str]
    files: dict[str, dict[str, list[Path]]]  # split -> class -> image paths, sorted
    skipped: Counter = field(default_factory=Counter)  # reason -> count (hidden, not an image, ...)
    rejected: dict[Path, str] = field(default_factory=dict)  # files named but unusable (a table's rows), with why
    multilabel: bool = False  # a file may be listed under several classes (a table's ``a; b`` cells)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path, skipped: Counter | None = None, root: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted); hidden and non-image files are left
    out and, when ``skipped`` is given, counted there by reason. Symbolic links are followed while
    they stay inside ``root`` (the dataset; default ``folder``); links that leave it, loop back or
    lead nowhere are skipped and counted."""
    skipped = Counter() if skipped is None else skipped
    root = Path(root or folder).resolve()
    images, walked = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here, real = Path(dirpath), Path(dirpath).resolve()
        reason = _link_problem(real, root, walked)
        if reason:
            skipped[reason] += 1
            dirnames.clear()
            continue
        walked.add(real)
        for path in (here / name for name in filenames):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                skipped["hidden file"] += 1
            elif not _is_text(str(path)):
                skipped["file name not in UTF-8 (rename it)"] += 1  # no CSV, report or Parquet file could name it
            elif not path.exists():
                skipped["broken symbolic link"] += 1
            elif not path.resolve().is_relative_to(root):
                skipped["symbolic link leaving the dataset"] += 1
            elif is_image_name(path):
                images.append(path)
            else:
                skipped["not an image file"] += 1
    return sorted(images)


def _is_text(name: str) -> bool:
    """Whether ``name`` is text: bytes that are not UTF-8 come from the file system as lone surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _link_problem(real: Path, root: Path, walked: set[Path]) -> str | None:
    """Why a folder reached through a link is not walked: outside the dataset, or already walked
    (or one of its own parents): a loop."""
    if not real.is_relative_to(root):
        return "symbolic link leaving the dataset"
    if real in walked or any(real in done.parents for done in walked):
        return "symbolic link loop"
    return None


def check_class_name(name: str, where: str, what: str) -> None:
    """Class names are data, any Unicode; a control character (a newline...) or bytes that are not
    text cannot be shown or stored faithfully: one line naming ``where`` it was found and ``what`` to rename."""
    bad = [ch for ch in name if unicodedata.category(ch) in ("Cc", "Cs")]
    if bad:
        raise TlpipeError(f"{where} has a control character or bytes that are not text: rename the {what} (letters, "
                          "digits, spaces, punctuation and emoji all work)")


def check_root(root: str | Path) -> Path:
    """``root`` as a dataset folder that is there; one line when it is missing or a file. Light (no
    image library): the CLI calls it before the heavy imports, so a mistyped path is told at once."""
    root = Path(root).expanduser()
    if not root.exists():
        raise TlpipeError(f"dataset folder not found: {root} ({LAYOUT_HINT})")
    if not root.is_dir():
        raise TlpipeError(f"dataset path is not a folder: {root} ({LAYOUT_HINT})")
    return root


def scan_folder(root: str | Path, evaluation: bool = False) -> ScannedFiles:
    """List the images of ``root`` per split and class; raises ``TlpipeError`` on a bad layout.
    ``evaluation``: the folder scores a model rather than trains one, so any split folders will do
    (test/ alone), and any number of classes; class folders without images are left out, and a
    flat folder is the split ``WHOLE_FOLDER`` (none of it was necessarily trained on)."""
    root = check_root(root)
    top = _visible_dirs(root)
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in top if d.name.lower() in SPLIT_ALIASES}
    for split in split_dirs:  # val/ beside valid/: which one is val? never one silently left out
        if len(same := [d.name for d in top if SPLIT_ALIASES.get(d.name.lower()) == split]) > 1:
            raise TlpipeError(f"{root} has {', '.join(f'{name}/' for name in same)}: all name the {split} split; "
                              "merge them into one folder")
    skipped: Counter = Counter()
    if "train" in split_dirs or (evaluation and split_dirs):
        # Beside the split folders, nothing holds images; others (an extra split such as
        # test_simple/, notes) are left out and reported rather than guessed at.
        beside = "train/" if "train" in split_dirs else ", ".join(f"{d.name}/" for d in split_dirs.values())
        for other in (d for d in top if d.name.lower() not in SPLIT_ALIASES):
            skipped[f"folder beside {beside} ignored ({other.name}/)"] += 1
        roots = split_dirs
    elif split_dirs:
        found = ", ".join(f"{d.name}/" for d in split_dirs.values())
        raise TlpipeError(f"{root} has {found} but no train/ folder: add train/ or remove the split folders")
    else:
        roots = {WHOLE_FOLDER if evaluation else "train": root}
    if evaluation:  # every class folder of every split, until _with_images drops the empty ones
        classes = sorted({d.name for split_root in roots.values() for d in _visible_dirs(split_root)})
    else:
        classes = _training_classes(roots["train"])
    files: dict[str, dict[str, list[Path]]] = {}
    for split, split_root in roots.items():
        split_classes = [d.name for d in _visible_dirs(split_root)]
        unknown = sorted(set(split_classes) - set(classes))
        if unknown:
            raise TlpipeError(
                f"{split_root} has class folder(s) {', '.join(unknown)} that {roots['train']} lacks: "
                "every class must have training images"
            )
        for loose in (p for p in split_root.iterdir() if p.is_file()):
            skipped["hidden file" if loose.name.startswith(".") else "file outside a class folder"] += 1
        for folder in _visible_dirs(split_root):
            check_class_name(folder.name, f"folder name {folder.name!r} in {folder.parent}", "folder")
        files[split] = {c: image_files(split_root / c, skipped, root) for c in split_classes}
    if evaluation:
        classes, files = _with_images(root, files)
    return ScannedFiles(root=root, classes=classes, files=files, skipped=skipped)


def _training_classes(train: Path) -> list[str]:
    """The class folders of ``train``: at least two, or there is nothing to tell apart."""
    classes = [d.name for d in _visible_dirs(train)]
    if not classes:
        raise TlpipeError(f"no class folders in {train}: {LAYOUT_HINT}")
    if len(classes) < 2:
        raise TlpipeError(f"only one class folder ({classes[0]}) in {train}: a classifier needs at least 2 classes")
    return classes


def _with_images(root: Path, files: dict[str, dict[str, list[Path]]]) -> tuple[list[str], dict]:
    """The classes and splits left once folders without images are dropped: an empty folder has
    nothing to score. None left at all is an error."""
    files = {split: {c: paths for c, paths in per_class.items() if paths} for split, per_class in files.items()}
    files = {split: per_class for split, per_class in files.items() if per_class}
    if not files:
        raise TlpipeError(f"no image files in the class folders of {root}: nothing to score ({LAYOUT_HINT})")
    return sorted({c for per_class in files.values() for c in per_class}), files


def expand_image_paths(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files and folders (searched recursively) → (usable image paths, [(path, why not)])."""
    images, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = image_files(item)
            if not found:
                problems.append((item, "folder holds no image files"))
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            problems.append((item, "no such file or folder"))
    good = []
    for path in images:
        reason = check_image(path)
        if reason:
            problems.append((path, reason))
        else:
            good.append(path)
    return good, problems
