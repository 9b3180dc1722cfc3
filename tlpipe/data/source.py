"""What a user gives as data, resolved once (``as_source``): a ``ClassFolder`` (a folder per class,
optionally under train/ val/ test/) or a ``LabelTable`` (a table of paths and labels). Every stage
asks both the same questions: where the images are (``folder``: never written to), the path that
names it, a short name, its identity in a fit's key, its record in summary.json, and its files
(``scan``). A URL becomes its local copy first (``tlpipe.data.remote``)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tlpipe.data.remote import is_url, local_copy
from tlpipe.data.scan import ScannedFiles, check_root, scan_folder
from tlpipe.data.table import TABLE_SUFFIXES, LabelTable
from tlpipe.errors import TlpipeError


@dataclass(frozen=True)
class ClassFolder:
    """A dataset given as a folder of class folders."""

    root: Path

    def __str__(self) -> str:
        return str(self.root)

    @property
    def folder(self) -> Path:
        """The folder the images are under: where tlpipe never writes."""
        return self.root

    @property
    def path(self) -> Path:
        return self.root

    @property
    def name(self) -> str:
        return self.root.resolve().name

    def identity(self) -> str:
        return str(self.root.resolve())

    def record(self) -> dict:
        return {"data": str(self.root.resolve())}

    def scan(self, evaluation: bool = False) -> ScannedFiles:
        return scan_folder(self.root, evaluation)


DataSource = ClassFolder | LabelTable


def as_source(data: Any) -> DataSource:
    """The dataset a user gave: a ``ClassFolder``, or a ``LabelTable`` for a table file (by its
    suffix), a DataFrame or a ``LabelTable`` itself; one already resolved, as it is."""
    if isinstance(data, ClassFolder):
        return data
    if hasattr(data, "columns") and hasattr(data, "iloc"):  # a pandas DataFrame, without importing pandas
        data = LabelTable(data)
    if isinstance(data, LabelTable):  # the root fixed now, as the user spelt it: a DataFrame's is today's working folder
        given = replace(data, source=Path(data.source).expanduser()) if data.is_file else data
        return replace(given, root=given.folder)
    if is_url(data):  # a store's URL: its local copy (tlpipe.data.remote)
        data = local_copy(data)
    path = Path(data).expanduser()
    return LabelTable(path) if path.suffix.lower() in TABLE_SUFFIXES and not path.is_dir() else ClassFolder(path)


def check_source(data: Any) -> None:
    """A class folder that is missing or a file, told in one line (``check_root``) before any heavy
    import; a table is checked when it is read."""
    if data is not None and not is_url(data) and isinstance(source := as_source(data), ClassFolder):
        check_root(source.root)


def with_table_options(data: Any, root: Path | None = None, path_col: str | None = None, label_col: str | None = None,
                       split_col: str | None = None, task: str | None = None) -> Any:
    """``data`` read with the command line's table options (``--root``, ``--path-col``, ``--task``...),
    which a class folder refuses; a URL as its local copy (``tlpipe.data.remote``)."""
    given = {k: v for k, v in (("root", root), ("path_col", path_col), ("label_col", label_col),
                               ("split_col", split_col), ("task", task)) if v is not None}
    if is_url(data):  # its local copy, made once for the whole command
        data = local_copy(data)
    if not given:
        return data
    source = as_source(data) if data is not None else None
    if not isinstance(source, LabelTable):
        flag = "--" + next(iter(given)).replace("_", "-")
        raise TlpipeError(f"{flag} is for a table of image paths and labels (.csv, .tsv, .parquet), not {data or '--example'}")
    return replace(source, **given)


def recorded_source(summary: dict) -> DataSource | None:
    """The dataset a fit's summary names (``record``), when it is still there (a DataFrame's rows are
    not kept; a summary of a run cut before it saved anything names none)."""
    if not summary.get("data"):
        return None
    try:
        path, table = Path(summary["data"]), summary.get("data_table")
        if table is None:
            return ClassFolder(path) if path.is_dir() else None
        if not (table["file"] and path.is_file()):
            return None
        return LabelTable(path, Path(table["root"]), table["path_col"], table["label_col"], table["split_col"],
                          table.get("task", "auto"))
    except (KeyError, TypeError):  # a summary edited by hand: the data it names is not known
        return None
