"""Data stage: scan a folder, check every image, split, and load batches."""
from tlpipe.data.dataset import QUARANTINE_REPORT, DatasetSpec, Sample, prepare_dataset, write_quarantine_report
from tlpipe.data.images import IMAGE_EXTENSIONS, check_image, load_rgb
from tlpipe.data.loader import eval_loader, eval_transform
from tlpipe.data.scan import scan_folder

__all__ = [
    "IMAGE_EXTENSIONS", "QUARANTINE_REPORT", "DatasetSpec", "Sample", "check_image", "eval_loader",
    "eval_transform", "load_rgb", "prepare_dataset", "scan_folder", "write_quarantine_report",
]
