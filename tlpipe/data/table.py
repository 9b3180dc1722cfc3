"""Images listed in a table (``labels.csv``, ``.tsv``, ``.parquet``, or a pandas DataFrame): a path
column, a label column and optionally a split column, read into the same ``ScannedFiles`` a class
folder gives, so every later stage is the same. A label cell may hold several labels (``beach;
people``): the table is then multi-label, each file listed under every label it has.

Only reads the table and the files it names. A row that cannot be used (no such file, a path
leaving the root, an empty label, the same file listed twice with different labels) is
quarantined with its reason; a table that cannot be read, a missing column or a split that is not
train/val/test is one ``TlpipeError`` naming the table, the row and the fix.
"""
from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any

from tlpipe.data.images import is_image_name
from tlpipe.data.scan import SPLIT_ALIASES, WHOLE_FOLDER, ScannedFiles, check_class_name
from tlpipe.errors import TlpipeError

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
# Column names found without being told, in this order (compared without case): the names tables
# from Kaggle, AutoGluon, fastai and Label Studio exports use.
COMMON_NAMES = {
    "path": ("path", "filepath", "file_path", "file", "filename", "file_name", "image", "image_path", "img", "fname"),
    "label": ("label", "labels", "class", "class_name", "category", "target", "y"),
    "split": ("split", "subset", "set", "partition"),
}
TASKS = ("auto", "multiclass", "multilabel")
LABEL_DELIMITER = ";"  # several labels in one cell (``beach; people``): a multi-label table


@dataclass(frozen=True, eq=False)
class LabelTable:
    """A dataset given as a table: ``source`` a file or a DataFrame; image paths relative to
    ``root`` (default: the table's folder, or the working folder for a DataFrame) or absolute
    inside it; columns named, or found among ``COMMON_NAMES``."""

    source: Path | Any  # a pandas DataFrame when not a file
    root: Path | None = None
    path_col: str | None = None
    label_col: str | None = None
    split_col: str | None = None
    task: str = "auto"  # multilabel, multiclass (a ';' is part of the label), or auto: multi-label when a cell holds a ';'

    def __post_init__(self):
        if self.task not in TASKS:
            raise TlpipeError(f"task {self.task!r} is not one of {', '.join(TASKS)}")

    @property
    def is_file(self) -> bool:
        return isinstance(self.source, Path)

    @property
    def folder(self) -> Path:
        """The folder the images are under: where tlpipe never writes."""
        return Path(self.root or (self.source.parent if self.is_file else Path.cwd())).expanduser()

    @property
    def name(self) -> str:
        return self.source.stem if self.is_file else "table"

    @property
    def path(self) -> Path:
        """What names it: its table file, or a DataFrame's image root."""
        return self.source if self.is_file else self.folder

    def record(self) -> dict:
        """What a fit's summary says of it, enough for ``recorded_source`` to read it again."""
        columns = {"path_col": self.path_col, "label_col": self.label_col, "split_col": self.split_col, "task": self.task}
        return {"data": str(self.path.resolve()), "data_table": {"file": self.is_file, "root": str(self.folder.resolve()), **columns}}

    def scan(self, evaluation: bool = False) -> ScannedFiles:
        return scan_table(self, evaluation)

    def identity(self) -> str:
        """What names this table: its file (or, for a DataFrame, its content), root and columns."""
        if self.is_file:
            what = str(self.source.resolve())
        else:
            import pandas as pd

            what = hashlib.sha256(pd.util.hash_pandas_object(self.source, index=True).values.tobytes()).hexdigest()
        return repr((what, str(self.folder.resolve()), self.path_col, self.label_col, self.split_col, self.task))


def scan_table(table: LabelTable, evaluation: bool = False) -> ScannedFiles:
    """The table's images per split and label, its unusable rows in ``rejected``. ``evaluation``: the
    table scores a model (any splits, any labels); else every label needs a train row."""
    frame, where = _read(table), str(table.source) if table.is_file else "the DataFrame"
    columns = {role: _column(frame, role, given, where) for role, given in
               (("path", table.path_col), ("label", table.label_col), ("split", table.split_col))}
    root = table.folder
    if not root.is_dir():
        raise TlpipeError(f"the image root {root} of {where} is not a folder: give the folder the paths are relative "
                          "to with --root")
    numbers = range(2, len(frame) + 2) if table.is_file else frame.index  # a file's lines (the header is 1), a frame's index
    rows = _rows(frame, columns, numbers, where, evaluation, split_cells=table.task != "multiclass")
    files, rejected, skipped = _files(rows, root.resolve(), root)  # files: every row's, the rejected ones too
    multilabel = table.task == "multilabel" or (table.task == "auto" and any(len(labels) > 1 for _, _, labels, _ in rows))
    labels = sorted({label for per_label in files.values() for label in per_label})
    if not evaluation:
        train = set(files.get("train", {}))
        unseen = sorted(set(labels) - train)
        if unseen:
            raise TlpipeError(f"{where}: label(s) {', '.join(map(repr, unseen))} appear only in val/test rows; "
                              "add train rows with them or remove those rows")
        if len(train) < 2:
            raise TlpipeError(f"{where} has {len(train)} label(s) in its train rows ({', '.join(map(repr, sorted(train)))}): "
                              "a classifier needs at least two; add rows of another label")
    for label in labels:
        check_class_name(label, f"label {label!r} in {where}", "label")
    return ScannedFiles(root, labels, files, skipped, rejected, multilabel)


def _read(table: LabelTable):
    import pandas as pd

    if not table.is_file:
        return _as_text(table.source)
    path = table.source
    if not path.is_file():
        raise TlpipeError(f"table not found: {path} (a .csv, .tsv or .parquet of image paths and labels)")
    try:
        if path.suffix.lower() == ".parquet":
            return _as_text(pd.read_parquet(path))
        return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False,
                           encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError, ImportError) as exc:  # pandas' parser errors are ValueErrors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TlpipeError(f"cannot read the table {path}: {first}; write it as UTF-8 CSV (or TSV, Parquet) with a "
                          "header row") from None


def _as_text(frame):
    """Every cell as the text a CSV would hold: integer labels stay ``1`` (not ``1.0`` beside a missing
    one), a missing cell is empty, and column names are strings."""
    return frame.convert_dtypes().astype(str).where(frame.notna(), "").rename(columns=str)


def _column(frame, role: str, given: str | None, where: str) -> str | None:
    """The column playing ``role``: the one given, else the first common name found (any case)."""
    names = [str(c) for c in frame.columns]
    if given is not None:
        if given not in names:
            raise TlpipeError(f"{where} has no column {given!r} (--{role}-col); its columns: {', '.join(names)}")
        return given
    by_lower = {name.strip().lower(): name for name in reversed(names)}
    found = next((by_lower[c] for c in COMMON_NAMES[role] if c in by_lower), None)
    if found is None and role != "split":
        raise TlpipeError(f"{where} has no {role} column (looked for {', '.join(COMMON_NAMES[role][:4])}...; its "
                          f"columns: {', '.join(names)}): name it with --{role}-col")
    return found


def _rows(frame, columns: dict, numbers, where: str, evaluation: bool,
          split_cells: bool = True) -> list[tuple[Any, str, tuple[str, ...], str]]:
    """(row as the user counts it, path, its labels, split) for every row, the split checked; with
    ``split_cells`` a cell ``a; b`` holds the labels a and b (sorted, each once; none when the cell
    is empty), else the one label ``a; b``. Labels in Unicode's composed form (NFC): a label typed
    on a Mac (decomposed) and one typed elsewhere are one class."""
    rows = []
    whole = WHOLE_FOLDER if evaluation else "train"  # no split column: scored whole, or all of it trained on
    for number, path, label, split in zip(numbers, frame[columns["path"]], frame[columns["label"]],
                                          frame[columns["split"]] if columns["split"] else [None] * len(frame)):
        split = "train" if split is None and not evaluation else split
        if split is not None and (split := str(split).strip().lower() or "train") not in SPLIT_ALIASES:
            raise TlpipeError(f"{where} row {number}: split {split!r} is not train, val or test (nor valid, validation)")
        parts = str(label).split(LABEL_DELIMITER) if split_cells else [str(label)]
        labels = tuple(sorted({unicodedata.normalize("NFC", part.strip()) for part in parts} - {""}))  # one café
        rows.append((number, str(path).strip(), labels, SPLIT_ALIASES[split] if split else whole))
    return rows


def _files(rows, real_root: Path, root: Path) -> tuple[dict, dict[Path, str], Counter]:
    """split -> label -> sorted paths, each file under one spelling (``_located``); the files that
    cannot be used, with why (they stay listed: the data check reports them with the folder's
    rules, never reading one); rows skipped."""
    seen: dict[Path, tuple[int, tuple[str, ...], str]] = {}
    rejected: dict[Path, str] = {}
    skipped: Counter = Counter()
    for number, name, labels, split in rows:
        if not name:
            skipped["table row without a path"] += 1
            continue
        path, reason = _located(root, real_root, name)
        if path in seen:
            first, first_labels, first_split = seen[path]
            if (first_labels, first_split) != (labels, split):
                rejected[path] = f"listed twice with different labels or splits (rows {first} and {number})"
            else:
                skipped["duplicate table row"] += 1
            continue
        seen[path] = (number, labels, split)
        if reason or not labels:
            rejected[path] = f"{reason or 'empty label'} (row {number})"
    files: dict[str, dict[str, list[Path]]] = {}
    for path, (_, labels, split) in seen.items():
        for label in labels:  # a multi-label row's file is listed under each of its labels
            files.setdefault(split, {}).setdefault(label, []).append(path)
    return {s: {c: sorted(ps) for c, ps in sorted(per.items())} for s, per in files.items()}, rejected, skipped


def _located(root: Path, real_root: Path, name: str) -> tuple[Path, str | None]:
    """The file a row names, spelt as one path under ``root`` (so ``a/../b.jpg``, an absolute path or a
    link to a file in the root are that file), and why it cannot be used, if it cannot."""
    if "\\" in name and not (root / name).exists():  # a table written on Windows: img\cat.jpg
        name = PureWindowsPath(name).as_posix()
    written = root / name  # an absolute name replaces root
    try:
        real = written.resolve()
        if not real.is_relative_to(real_root):
            return written, f"path {name!r} leaves the image root"
        path = root / real.relative_to(real_root)
        if not path.is_file():
            return path, "no such file"
        return path, None if is_image_name(path) else "not an image file"
    except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a link loop, a name over 255 bytes
        return written, f"unreadable path ({type(exc).__name__}: {exc})"
