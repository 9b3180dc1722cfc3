"""The CNN-codes file format written by ``tlpipe extract``.

``.npz`` (read with ``np.load(path)``, no pickle needed):
  ``features`` float32 (N, D); ``labels`` int64 (N,), index into ``classes``; ``classes`` str (C,);
  ``paths`` str (N,), relative to the dataset folder, POSIX separators; ``splits`` str (N,):
  train / val / test as found in the folder; ``meta`` str (): JSON with backbone, weights source
  and sha256, layer, data config, tlpipe version, and the files left out with the reason.
``.parquet``: columns ``path``, ``split``, ``label``, ``class``, ``features`` (fixed-size list of
  float32); the same ``meta`` JSON in the schema metadata under ``b"tlpipe"``.
Rows are sorted by split, class, then path, so the same data gives the same file.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from tlpipe.version import __version__
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.models import Backbone, resolve_layer
from tlpipe.utils import atomic_write

FORMATS = (".npz", ".parquet")


def save_codes(out: Path, spec: DatasetSpec, parts: dict[str, tuple[np.ndarray, np.ndarray]], backbone: Backbone, config: FitConfig) -> Path:
    """``out`` (checked first with ``tlpipe.paths.output_file(out, "--out", suffixes=FORMATS)``)."""
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
