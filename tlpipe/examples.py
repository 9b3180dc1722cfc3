"""Embedded example datasets, so ``tlpipe fit --example digits`` runs with no data of the user's."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal, get_args

from tlpipe.errors import TlpipeError

ExampleName = Literal["digits"]  # the CLI's --example choices
EXAMPLES = get_args(ExampleName)


def write_example(name: str, folder: Path) -> Path:
    """Write example ``name`` as a folder-per-class image dataset under ``folder``; return it."""
    if name != "digits":
        raise TlpipeError(f"unknown example '{name}': use one of {', '.join(EXAMPLES)}")
    import numpy as np  # here, not at the top: the CLI imports this module for --help
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1,797 8x8 greyscale digits bundled with scikit-learn
    root = Path(folder) / "example-digits"
    if (root / ".complete").exists():
        return root
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        pixels = (255 - image * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        path = root / f"digit_{target}" / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).save(path)
    (root / ".complete").touch()
    return root


def fit_data(data: str | Path | None, example: str | None, output: str | Path | None) -> tuple[Path, Path]:
    """The dataset folder a fit reads and its output folder (default ``runs/<data>-<time>``):
    ``data``, or the embedded ``example`` written into the output folder."""
    if (data is None) == (example is None):
        raise TlpipeError("give a dataset folder (tlpipe fit ./data) or --example digits, not both or neither")
    if example is not None:
        out = Path(output) if output else default_output(Path(f"example-{example}"))
        return write_example(example, out), out
    data = Path(data).expanduser()
    return data, Path(output) if output else default_output(data)


def default_output(data: Path) -> Path:
    return Path("runs") / f"{data.resolve().name}-{datetime.now():%Y%m%d-%H%M%S}"
