"""Datasets where users keep them: a URL read through fsspec (``s3://``, ``gs://``, ``az://``, ``hf://``,
``https://``, ``memory://``, ``file://``...; the store's own fsspec package and credentials) becomes a
local folder that every stage reads like any other.

Why a copy: each stage reads the images again (the data check, the frozen pass, every epoch), so they
come over the network once, into ``data_cache()/<url hash>/<name>``. A later fit of the same URL
fetches only the files whose size or version (ETag, mtime) changed and drops the ones gone; a killed
copy resumes, since the record of what the copy holds (beside it) is written as each batch lands.
Nothing is written to the user's store. A ``file://`` URL is the local folder itself, not copied.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tlpipe.errors import TlpipeError
from tlpipe.progress import announce
from tlpipe.utils import atomic_write

FETCH_BATCH = 1024  # files fetched at once (concurrently, on stores whose fsspec package is async) between records
VERSION_FIELDS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")


def is_url(data: object) -> bool:
    return isinstance(data, str) and "://" in data


def data_cache() -> Path:
    """Where copies of remote datasets live: ``TLPIPE_DATA_CACHE``, else the user's cache folder."""
    if given := os.environ.get("TLPIPE_DATA_CACHE"):
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tlpipe" / "data"


def local_copy(url: str) -> Path:
    """The local folder ``url`` names, copied from its store when it is remote; for a URL naming a
    file (a table of paths and labels), that file in the copy of its folder."""
    import fsspec
    from filelock import FileLock
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing (s3fs, gcsfs...)
        raise TlpipeError(f"cannot read {url}: {exc}") from None
    if isinstance(fs, LocalFileSystem):
        return Path(path)
    is_file = _stat(fs, path, url)["type"] != "directory"
    folder = path.rstrip("/").rsplit("/", 1)[0] if is_file else path.rstrip("/")
    listing = _listing(fs, folder, url)
    home = data_cache() / hashlib.sha256(f"{fs.protocol}:{folder}".encode()).hexdigest()[:16]
    copy = home / (folder.rsplit("/", 1)[-1] or "root")  # named as the store names it: runs and reports say so
    home.mkdir(parents=True, exist_ok=True)
    with FileLock(home / "copy.lock"):  # two fits of one URL: the second waits, then finds it whole
        _sync(fs, folder, listing, copy, home / "listing.json", url)
    return copy / path.rstrip("/").rsplit("/", 1)[-1] if is_file else copy


def _stat(fs, path: str, url: str) -> dict:
    try:
        return fs.info(path)
    except FileNotFoundError:
        raise TlpipeError(f"nothing at {url}: check the URL (a folder of class folders, or a table)") from None
    except Exception as exc:  # credentials, network: each store raises its own kinds
        raise TlpipeError(f"cannot read {url} ({type(exc).__name__}: {exc}): check the URL and the store's "
                          "credentials (its fsspec package reads them as its SDK does)") from None


def _listing(fs, folder: str, url: str) -> dict[str, list]:
    """Each file under ``folder`` (relative path -> [size, version]); a path that is not under it or
    would leave the copy (``..``, an absolute key) is refused."""
    try:
        found = fs.find(folder, detail=True)
    except Exception as exc:
        raise TlpipeError(f"cannot list {url} ({type(exc).__name__}: {exc}): check the URL and the store's credentials") from None
    listing = {}
    for path, info in found.items():
        relative = path[len(folder) + 1:]
        if not path.startswith(folder + "/") or not relative or relative.startswith("/") or ".." in relative.split("/"):
            raise TlpipeError(f"{url}: the object {path!r} would land outside the dataset's copy; rename it in the store")
        version = next((str(info[k]) for k in VERSION_FIELDS if info.get(k) is not None), "")
        listing[relative] = [int(info.get("size") or 0), version]
    if not listing:
        raise TlpipeError(f"nothing at {url}: the folder holds no files")
    return listing


def _part(path: Path) -> Path:
    """Where a file is fetched to before it takes its name (hidden: a scan skips it; not in the
    listing: the next sync removes what a killed copy left)."""
    return path.with_name(f".{path.name}.tlpipe-part")


def _sync(fs, folder: str, listing: dict[str, list], copy: Path, record: Path, url: str) -> None:
    """Make ``copy`` hold exactly ``listing``: fetch what is missing, short or changed since the
    ``record`` of what the copy holds (written as each batch of files lands; each file fetched
    beside its name, then renamed whole), remove what the store no longer has."""
    held = json.loads(record.read_text()) if record.is_file() else {}
    if held == listing and copy.is_dir():
        return
    # a file the record does not name: kept when its size matches (the first copy, killed, resumes)
    fetch = [name for name, entry in listing.items() if held.get(name, entry) != entry
             or not (copy / name).is_file() or (copy / name).stat().st_size != entry[0]]
    gone = [path for path in copy.rglob("*") if path.is_file() and path.relative_to(copy).as_posix() not in listing]
    for path in gone:
        path.unlink()
    held = {name: entry if name not in fetch else [-1, ""] for name, entry in listing.items()}  # -1: fetch it
    if fetch:
        megabytes = sum(listing[name][0] for name in fetch) / 1e6
        announce(f"copying {len(fetch)} files ({megabytes:,.0f} MB) of {url} to {copy}")
    for start in range(0, len(fetch), FETCH_BATCH):
        batch = fetch[start:start + FETCH_BATCH]
        atomic_write(record, lambda f: json.dump(held, f))
        parts = [_part(copy / name) for name in batch]  # whole files only under their names: a fit may be reading
        for part in parts:
            part.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get([f"{folder}/{name}" for name in batch], [str(part) for part in parts])
        except Exception as exc:
            raise TlpipeError(f"copying {url} to {copy} failed ({type(exc).__name__}: {exc}); run again to "
                              "resume: the files already copied are kept") from None
        for part, name in zip(parts, batch):
            os.replace(part, copy / name)
        held.update({name: listing[name] for name in batch})
    copy.mkdir(parents=True, exist_ok=True)
    atomic_write(record, lambda f: json.dump(listing, f))
