"""Embedded example datasets, so ``tlpipe fit --example digits`` runs with no data of the user's."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from tlpipe.errors import TlpipeError

if TYPE_CHECKING:
    from tlpipe.data.source import DataSource

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
    complete = Path(folder) / ".example-digits.complete"  # beside the dataset: a file in it would be counted as skipped
    if complete.exists():
        return root
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        pixels = (255 - image * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        path = root / f"digit_{target}" / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).save(path)
    complete.touch()
    return root


def fit_data(data: Any, example: str | None, output: str | Path | None) -> tuple[DataSource, Path]:
    """The dataset a fit reads (a class folder, or a table: ``tlpipe.data.source.as_source``) and its
    output folder (default ``runs/<data>-<time>``): ``data``, or the embedded ``example`` written
    into the output folder."""
    from tlpipe.data.source import as_source  # not at the top: the CLI imports this module for --help

    if (data is None) == (example is None):
        raise TlpipeError("give a dataset folder (tlpipe fit ./data) or --example digits, not both or neither")
    if example is not None:
        from tlpipe.paths import output_folder

        out = output_folder(output or default_output(f"example-{example}"), "--output")  # usable before the example goes in
        return as_source(write_example(example, out)), out
    source = as_source(data)
    return source, Path(output) if output else default_output(source.name)


def default_output(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
