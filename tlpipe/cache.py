"""What a fit keeps between runs under ``<output>/cache`` (or the recipe's ``cache_dir``): the
decoded images, the CNN codes and the transfer-signals pass.

Every entry is named by ``cache_key``: a sha256 of the files it was computed from (path, size,
mtime, label: ``fingerprint``) and of everything else it depends on, so an edited file or a new
setting gets a new entry instead of stale arrays. Entries are written atomically: a killed fit
leaves none half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from tlpipe.version import __version__
from tlpipe.utils import atomic_write


def cache_root(cache_dir: str | Path | None, output: str | Path) -> Path:
    """The cache folder: the recipe's ``cache_dir`` when it names one, else ``<output>/cache``."""
    return Path(cache_dir) if cache_dir else Path(output) / "cache"


def fingerprint(samples: Iterable) -> list[list]:
    """Each sample's path, size, modification time and label: what says the file is unchanged."""
    files = []
    for sample in samples:
        st = os.stat(sample.path)
        label = list(sample.label) if isinstance(sample.label, tuple) else int(sample.label)
        files.append([str(sample.path), st.st_size, st.st_mtime_ns, label])
    return files


def cache_key(samples: Iterable, **what) -> str:
    """sha256 of ``fingerprint(samples)``, the tlpipe version and ``what`` the entry holds."""
    key = json.dumps({"tlpipe": __version__, "files": fingerprint(samples), **what}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()


def load_cached(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays ``save_cached`` wrote under ``key``, or None when missing, stale or unreadable (the
    caller then computes and writes them anew)."""
    try:
        with np.load(path) as saved:
            if str(saved["key"]) != key:
                return None
            return {name: saved[name] for name in saved.files if name != "key"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def save_cached(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` to ``path`` with ``key``, atomically (a killed fit leaves no half-written cache)."""
    atomic_write(path, lambda f: np.savez(f, key=np.array(key), **arrays), mode="wb")
