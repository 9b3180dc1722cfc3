"""The benches' common first step: a ``../shared/data`` set's CNN codes (``tlpipe extract``, default
recipe), extracted once into OUT and split into train and val."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def train_val_codes(name: str, out: Path, layer: str = "penultimate"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, X_val, y_val) of ``SHARED/name`` at the tap ``layer``, from ``out/<name>.npz`` (written the
    first time; a file from another tap is refused)."""
    import json

    from tlpipe.config import load_config
    from tlpipe.explore import extract

    codes = out / f"{name}.npz"
    if not codes.is_file():
        extract(SHARED / name, codes, load_config("default", layer=layer))
    found = json.loads(str(np.load(codes)["meta"]))["layer"]
    if found != layer:
        raise SystemExit(f"{codes} holds the codes of layer {found!r}, not {layer!r}: give another folder")
    z = np.load(codes)
    train, val = z["splits"] == "train", z["splits"] == "val"
    return z["features"][train], z["labels"][train], z["features"][val], z["labels"][val]
