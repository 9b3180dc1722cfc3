"""tlpipe: transfer-learning AutoML for image classification.

The Python API mirrors the command line: ``fit`` a folder of images (or a ``LabelTable`` of paths
and labels: a CSV, TSV, Parquet file or a DataFrame), ``extract`` CNN codes, ``load_bundle`` a saved
model to predict.
"""
import os

# albumentations queries PyPI at import unless told not to (albumentations #1751): set it before
# any import can reach it, including in DataLoader worker processes, which inherit the environment.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from tlpipe.errors import TlpipeError  # noqa: E402
from tlpipe.version import __version__  # noqa: E402

__all__ = ["LabelTable", "TlpipeError", "__version__", "fit", "extract", "load_bundle"]


def __getattr__(name: str):
    # The heavy stack (torch, mlflow) loads only when the API is used, so `tlpipe --help` stays fast.
    if name == "fit":
        from tlpipe.pipeline import fit

        return fit
    if name == "extract":
        from tlpipe.explore import extract

        return extract
    if name == "LabelTable":
        from tlpipe.data.table import LabelTable

        return LabelTable
    if name == "load_bundle":
        from tlpipe.bundle.folder import load_bundle

        return load_bundle
    raise AttributeError(name)
