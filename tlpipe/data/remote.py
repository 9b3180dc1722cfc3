"""Datasets where users keep them: a URL read through fsspec (``s3://``, ``gs://``, ``az://``, ``hf://``,
``https://``, ``memory://``, ``file://``...; the store's own fsspec package and credentials) becomes a
local folder that every stage reads like any other.

Why a copy: each stage reads the images again (the data check, the frozen pass, every epoch), so they
come over the network once, into ``data_cache()/<url hash>-<name>``. A later fit of the same URL
fetches only the files whose size or version (ETag, mtime) changed and drops the ones gone; a killed
copy resumes, since the listing is recorded (beside the copy) only once every file is in. Nothing is written to the
user's store. A ``file://`` URL is the local folder itself, not copied.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tlpipe.errors import TlpipeError
from tlpipe.progress import announce
from tlpipe.utils import atomic_write

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
    digest = hashlib.sha256(f"{fs.protocol}:{folder}".encode()).hexdigest()[:16]
    copy = data_cache() / f"{digest}-{folder.rsplit('/', 1)[-1] or 'root'}"
    from filelock import FileLock

    copy.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(copy.with_name(copy.name + ".lock")):  # two fits of one URL: the second waits, then finds it whole
        _sync(fs, folder, listing, copy, url)
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
    """Each file under ``folder`` (relative path -> [size, version]); a key that would leave the copy
    (``..``, an absolute path) is refused."""
    try:
        found = fs.find(folder, detail=True)
    except Exception as exc:
        raise TlpipeError(f"cannot list {url} ({type(exc).__name__}: {exc}): check the URL and the store's credentials") from None
    listing = {}
    for path, info in found.items():
        relative = path[len(folder):].lstrip("/")
        if not relative or relative.startswith("/") or ".." in relative.split("/"):
            raise TlpipeError(f"{url}: the object {path!r} would land outside the dataset's copy; rename it in the store")
        version = next((str(info[k]) for k in VERSION_FIELDS if info.get(k) is not None), "")
        listing[relative] = [int(info.get("size") or 0), version]
    if not listing:
        raise TlpipeError(f"nothing at {url}: the folder holds no files")
    return listing


def _sync(fs, folder: str, listing: dict[str, list], copy: Path, url: str) -> None:
    """Make ``copy`` hold exactly ``listing``: fetch what is missing, short or changed since the last
    complete copy; remove what the store no longer has."""
    marker = copy.with_name(copy.name + ".listing.json")  # beside the copy, written last: the copy is complete
    previous = json.loads(marker.read_text()) if marker.is_file() else {}
    if previous == listing:
        return
    fetch = [name for name, (size, version) in listing.items() if previous.get(name, [size, version]) != [size, version]
             or not (copy / name).is_file() or (copy / name).stat().st_size != size]
    for old in previous.keys() - listing.keys():
        (copy / old).unlink(missing_ok=True)
    marker.unlink(missing_ok=True)  # from here until the end, the copy is incomplete
    if fetch:
        megabytes = sum(listing[name][0] for name in fetch) / 1e6
        announce(f"copying {len(fetch)} files ({megabytes:,.0f} MB) of {url} to {copy}")
        for name in fetch:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get([f"{folder}/{name}" for name in fetch], [str(copy / name) for name in fetch])
        except Exception as exc:
            raise TlpipeError(f"copying {url} to {copy} failed ({type(exc).__name__}: {exc}); run again to "
                              "resume: the files already copied are kept") from None
    atomic_write(marker, lambda f: json.dump(listing, f))
