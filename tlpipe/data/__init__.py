"""Data stage: what the user gave, resolved once (``source``: a class folder or a table, ``table``; a
URL's local copy, ``remote``), its files found (``scan``), every image checked (``images``) and split
(``dataset``), profiled without a network (``profile``), decoded once into a cache (``decoded``),
augmented (``augment``) and loaded in batches (``loader``).

The names below load on first use (PEP 562): ``tlpipe.data.scan`` or ``tlpipe.data.table`` alone
import no torch or albumentations, so a command can check its paths before the heavy imports."""
from importlib import import_module

_HOMES = {
    "CachedImages": "augment", "EpochSampler": "augment", "eval_array_transform": "augment", "train_transform": "augment",
    "build_decoded_cache": "decoded",
    "QUARANTINE_REPORT": "dataset", "DatasetSpec": "dataset", "Sample": "dataset", "prepare_dataset": "dataset",
    "stratified_order": "dataset", "stratified_subset": "dataset", "write_quarantine_report": "dataset",
    "IMAGE_EXTENSIONS": "images", "check_image": "images", "load_rgb": "images", "shorter_side": "images",
    "eval_loader": "loader", "eval_transform": "loader",
    "scan_folder": "scan",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"tlpipe.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'tlpipe.data' has no attribute {name!r}")
