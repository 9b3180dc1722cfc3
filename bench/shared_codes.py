"""The benches' common first step: a ``../shared/data`` set's CNN codes (``tlpipe extract``, default
recipe), extracted once into OUT and split into train and val."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def train_val_codes(name: str, out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, X_val, y_val) of ``SHARED/name``, from ``out/<name>.npz`` (written the first time)."""
    from tlpipe.explore import extract

    codes = out / f"{name}.npz"
    if not codes.is_file():
        extract(SHARED / name, codes)
    z = np.load(codes)
    train, val = z["splits"] == "train", z["splits"] == "val"
    return z["features"][train], z["labels"][train], z["features"][val], z["labels"][val]
