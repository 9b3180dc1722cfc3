"""Data stage: scan a folder, check every image, split, cache decoded images, and load batches."""
from tlpipe.data.augment import CachedImages, EpochSampler, eval_array_transform, train_transform
from tlpipe.data.decoded import build_decoded_cache
from tlpipe.data.dataset import (
    QUARANTINE_REPORT, DatasetSpec, Sample, prepare_dataset, stratified_subset, write_quarantine_report,
)
from tlpipe.data.images import IMAGE_EXTENSIONS, check_image, load_rgb, shorter_side
from tlpipe.data.loader import eval_loader, eval_transform
from tlpipe.data.scan import scan_folder

__all__ = [
    "IMAGE_EXTENSIONS", "QUARANTINE_REPORT", "CachedImages", "DatasetSpec", "EpochSampler", "Sample",
    "build_decoded_cache", "check_image", "eval_array_transform", "eval_loader", "eval_transform", "load_rgb",
    "prepare_dataset", "scan_folder", "shorter_side", "stratified_subset", "train_transform", "write_quarantine_report",
]
