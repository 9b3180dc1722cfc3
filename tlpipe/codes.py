"""The CNN-codes file format written by ``tlpipe extract``.

``.npz`` (read with ``np.load(path)``, no pickle needed):
  ``features`` float32 (N, D); ``labels`` int64 (N,), index into ``classes``; ``classes`` str (C,);
  ``paths`` str (N,), relative to the dataset folder, POSIX separators; ``splits`` str (N,):
  train / val / test as found in the folder; ``meta`` str (): JSON with backbone, weights source
  and sha256, layer, data config, tlpipe version, and the files left out with the reason.
``.parquet``: columns ``path``, ``split``, ``label``, ``class``, ``features`` (fixed-size list of
  float32); the same ``meta`` JSON in the schema metadata under ``b"tlpipe"``.
Rows are sorted by split, class, then path, so the same data gives the same file.

The cache of codes between fits (``cache_key``, ``load_cached``, ``save_cached``) is plain ``.npz``
too: a fit's ``<output>/cache/codes/<split>-<key>.npz``, the key a sha256 of all the arrays depend on.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

from tlpipe import __version__
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.errors import TlpipeError
from tlpipe.models import Backbone, resolve_layer, state_dict_sha256
from tlpipe.utils import atomic_write

FORMATS = (".npz", ".parquet")


def save_codes(out: Path, spec: DatasetSpec, parts: dict[str, tuple[np.ndarray, np.ndarray]], backbone: Backbone, config: FitConfig) -> Path:
    if out.suffix not in FORMATS:
        raise TlpipeError(f"cannot write codes to {out}: use a file name ending in {' or '.join(FORMATS)}")
    splits = [split for split in parts for _ in spec.splits[split]]
    paths = [spec.relative(s.path) for split in parts for s in spec.splits[split]]
    features = np.concatenate([parts[s][0] for s in parts]).astype(np.float32)
    labels = np.concatenate([parts[s][1] for s in parts]).astype(np.int64)
    meta = json.dumps({
        "tlpipe_version": __version__,
        "backbone": backbone.name, "arch": backbone.arch, "weights": backbone.weights.to_dict(),
        "layer": resolve_layer(backbone.model, config.layer), "layer_relu": config.layer_relu,
        "data_config": backbone.data_config,
        "quarantined": [[spec.relative(p), why] for p, why in spec.quarantined],
    }, default=str)
    if out.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, features=features, labels=labels, classes=np.array(spec.classes, dtype=str),
                 paths=np.array(paths, dtype=str), splits=np.array(splits, dtype=str), meta=np.array(meta))
        return atomic_write(out, lambda f: f.write(buffer.getvalue()), mode="wb")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "path": paths, "split": splits, "label": labels,
        "class": [spec.classes[i] for i in labels],
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1]),
    }).replace_schema_metadata({b"tlpipe": meta.encode()})
    return atomic_write(out, lambda f: pq.write_table(table, f), mode="wb")


def cache_key(backbone: Backbone, samples, device_type: str, **what) -> str:
    """sha256 of what codes computed from ``samples`` depend on: backbone name, pretrained weights
    checksum and the checksum of the weights as they are now (fine-tuning changes them),
    preprocessing, device type (CUDA extracts in bf16), each file's path, size, mtime and label, and
    ``what`` was computed (tap, ReLU...)."""
    files = []
    for sample in samples:
        st = Path(sample.path).stat()
        files.append([str(sample.path), st.st_size, st.st_mtime_ns, int(sample.label)])
    key = json.dumps({
        "tlpipe": __version__, "backbone": backbone.name, "weights_sha256": backbone.weights.sha256,
        "state_sha256": state_dict_sha256(backbone.model), "data_config": backbone.data_config,
        "device": device_type, "files": files, **what,
    }, sort_keys=True, default=str)
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
