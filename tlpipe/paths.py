"""The paths a user names, checked before any work, and paths read from files, kept inside their folder.

Every command that writes a file the user names (``export --out``, ``extract --out``, ``evaluate
--json-file``/``--plots``, ``inspect --json``) checks it here first, so an unusable path is one line
before minutes of work, never a traceback after it; an existing file is replaced only when the user
says so, and a bundle is never written into. Paths read from tlpipe's own files (``val_predictions.csv``)
are resolved by ``inside``: a crafted file cannot make a command read outside the dataset.
"""
from __future__ import annotations

import errno
import glob
import os
import re
from pathlib import Path
from typing import Any, Iterable

from tlpipe.errors import TlpipeError
from tlpipe.utils import process_alive, temporary_beside

BUNDLE_MANIFEST, BUNDLE_HEAD = "bundle.json", "head.safetensors"  # a model bundle's own files (tlpipe.bundle)
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]+\.tmp$")  # temporary_beside's names: .NAME.PID.RANDOM.tmp


def output_file(path: str | Path, flag: str, *, suffixes: Iterable[str] = (), overwrite: bool = False,
                companions: Iterable[str] = (), dataset: Any = None) -> Path:
    """``path`` as a file this command may write, its folder made; else one line saying why and
    what to do. ``suffixes``: the names it must end with; an existing file (or one of the
    ``companions`` written beside it, such as ``.json``) is replaced only with ``overwrite``;
    never inside ``dataset`` (or any of a list of them) or a model bundle."""
    path = Path(path).expanduser()
    suffixes = tuple(suffixes)
    _check_place(path, flag, dataset)
    if os.path.isdir(path):
        raise TlpipeError(f"{flag} {path} is a folder: give a file name, such as {path / ('out' + (suffixes or ('',))[0])}")
    if suffixes and not path.name.lower().endswith(suffixes):
        raise TlpipeError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)} (this command writes that "
                          f"kind of file): give a name such as {path.with_suffix(suffixes[0]).name}")
    existing = [p for p in (path, *(path.with_name(path.name + c) for c in companions)) if os.path.lexists(p)]
    if existing and not overwrite:
        raise TlpipeError(f"{flag} {existing[0]} exists: add --overwrite to replace it, or give another {flag}")
    _writable_folder(path.parent, f"{flag} {path}")
    return path


def output_folder(path: str | Path, flag: str, files: Iterable[str] = (), overwrite: bool = False,
                  dataset: Any = None) -> Path:
    """``path`` as a folder this command may write ``files`` into, made if missing; else one line.
    Never inside ``dataset`` (or any of a list of them) or a model bundle."""
    path = Path(path).expanduser()
    _check_place(path, flag, dataset, folder=True)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise TlpipeError(f"{flag} {path} is a file, not a folder: give a folder")
    existing = [path / name for name in files if os.path.lexists(path / name)]
    if existing and not overwrite:
        raise TlpipeError(f"{flag} {path} already holds {existing[0].name}: add --overwrite to replace it, "
                          f"or give another {flag}")
    _writable_folder(path, f"{flag} {path}")
    return path


def inside(root: str | Path, relative: str) -> Path | None:
    """``root / relative`` when it stays inside ``root`` (no absolute path, no ``..`` out, no link
    out); None otherwise: a path read from a file is never followed elsewhere."""
    root = Path(root).resolve()
    if not relative or Path(relative).is_absolute():
        return None
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError):
        return None
    return path if path.is_relative_to(root) else None


def sweep_temporaries(folder: Path, of: str | None = None, recursive: bool = False, skip: Iterable[str] = ()) -> None:
    """Remove the temporary files a killed tlpipe process left in ``folder``: those of the file
    ``of`` whose writer is gone (a user's folder: nothing else is touched), or, without ``of``, all
    in a folder tlpipe owns (a fit's output) but a live writer's. ``skip``: top-level folders not searched."""
    folder, skip = Path(folder), set(skip)
    if not folder.is_dir():
        return
    pattern = f".{glob.escape(of)}.*.tmp" if of else ".*.tmp"
    for path in folder.rglob(pattern) if recursive else folder.glob(pattern):
        if path.relative_to(folder).parts[0] in skip or not path.is_file():
            continue
        match = _TEMPORARY.match(path.name)
        if match is None and of is None or match is not None and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def too_long(exc: OSError) -> str | None:
    """The one line for a path the file system refuses as too long (None: another error)."""
    if exc.errno != errno.ENAMETOOLONG:
        return None
    name = str(exc.filename or "")
    shown = name if len(name) <= 80 else f"{name[:60]}…{name[-16:]}"
    return f"file name too long ({len(Path(name).name)} characters): {shown}; shorten it (most file systems take 255 bytes)"


def _check_place(path: Path, flag: str, dataset: Any, folder: bool = False) -> None:
    """The name fits the file system; the place (``path``, a ``folder`` or a file) is outside the
    dataset (tlpipe never writes there: a new folder would be read as a class) and outside any model
    bundle (its files are checksummed)."""
    for part in path.parts:
        if len(part.encode()) > 255:
            raise TlpipeError(f"{flag}: a name in the path is {len(part.encode())} bytes long (at most 255): "
                              f"{part[:40]}…; shorten it")
    where = path.absolute()
    for source in dataset if isinstance(dataset, list) else [dataset]:
        if source is not None:
            _check_outside(where.resolve(), path, flag, source)
    for above in (where, *where.parents) if folder else where.parents:
        if (above / BUNDLE_MANIFEST).is_file() and (above / BUNDLE_HEAD).is_file():
            raise TlpipeError(f"{flag} {path} is inside the model bundle {above}: writing there would break it; "
                              "give a path outside it")


def _writable_folder(folder: Path, what: str) -> None:
    """Make ``folder`` (and its parents) and prove a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary_beside(folder / "probe").unlink()
    except OSError as exc:
        under = next((p for p in (folder.absolute(), *folder.absolute().parents) if os.path.lexists(p) and not os.path.isdir(p)), None)
        why = f"{under} is a file, not a folder" if under else exc.strerror or str(exc)
        raise TlpipeError(f"cannot write {what} ({why}): choose another place") from None


def _check_outside(where: Path, path: Path, flag: str, dataset: Any) -> None:
    """Nothing is written inside a class folder dataset (the next fit would take a new folder for a
    class). A table reads only the files it lists: its image root and the folders above it are
    refused (a fit replacing its files there could remove a user's), a folder beside its images not."""
    from tlpipe.data.source import as_source  # here: paths is imported for --help
    from tlpipe.data.table import LabelTable

    source = as_source(dataset)
    root = source.folder.resolve()
    if isinstance(source, LabelTable):
        if root.is_relative_to(where):
            raise TlpipeError(f"{flag} {path} holds the image folder {root} of the table: give a folder beside it, "
                              "not the folder itself or one above it")
    elif where.is_relative_to(root):
        raise TlpipeError(f"{flag} {path} is inside the dataset folder {source.folder}: tlpipe never writes "
                          "there (the next fit would take it for a class); give a path outside it")
