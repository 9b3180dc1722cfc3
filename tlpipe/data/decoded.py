"""A decoded-image cache: every image decoded and resized once, then reused by every epoch and trial.

The cache holds each sample as a ``size x size`` uint8 square cut exactly as timm's eval transform
cuts it (resize the shorter side to ``size`` with the backbone's interpolation, centre crop), so centre-cropping a cached
square to the backbone's input gives the same pixels as decoding the file again.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from tlpipe.cache import cache_key
from tlpipe.data.dataset import Sample
from tlpipe.data.images import load_rgb
from tlpipe.progress import progress_bar
from tlpipe.utils import default_workers

CACHE_FORMAT = 1  # bump when the stored pixels change for the same files


def centre_offset(excess: int) -> int:
    """Where torchvision's (hence timm's) CenterCrop starts: half the excess, rounded half to even."""
    return int(round(excess / 2.0))


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
              "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def cache_path(samples: Sequence[Sample], size: int, cache_dir: Path, crop: int | None = None,
               interpolation: str = "bicubic", squash: bool = False) -> Path:
    """The cache file for these samples: keyed by their paths, sizes and modification times, so an
    edited, replaced or reordered file set gets a new file instead of stale pixels."""
    resize = {} if (interpolation, squash) == ("bicubic", False) else {"interpolation": interpolation, "squash": squash}
    digest = cache_key(samples, format=CACHE_FORMAT, size=size, crop=crop, **resize)[:24]
    return Path(cache_dir) / f"decoded-{size}-{digest}.npy"


def decode_square(path: str | Path, size: int, crop: int | None = None, interpolation: str = "bicubic",
                  squash: bool = False) -> np.ndarray:
    """One image as a ``size x size x 3`` uint8 array: shorter side resized to ``size`` (torchvision's
    rounding of the longer side; ``squash``: both sides to ``size``, as timm's ``crop_mode="squash"``)
    with the backbone's ``interpolation``, then centre-cropped.

    The eval transform later takes a ``crop`` square from the middle of this one. Two centre crops
    in a row can land one pixel away from timm's single crop (torchvision rounds halves to even), so
    with ``crop`` given, this crop's offset is chosen to make the two add up to timm's exactly.
    """
    img = load_rgb(path, min_size=size)
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = size if squash else int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), RESAMPLING.get(interpolation, Image.Resampling.BICUBIC))
    inner = size if crop is None else crop
    left = centre_offset(new_w - inner) - centre_offset(size - inner)
    top = centre_offset(new_h - inner) - centre_offset(size - inner)
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def build_decoded_cache(
    samples: Sequence[Sample], size: int, cache_dir: Path, workers: int | None = None, crop: int | None = None,
    interpolation: str = "bicubic", squash: bool = False,
) -> np.ndarray:
    """All ``samples`` decoded into one ``(N, size, size, 3)`` uint8 array, memory-mapped from
    ``cache_dir``; built on first use, reused while the files are unchanged.

    ``size`` is ``decode_size(data_config)``; pass the backbone's input side as ``crop`` to make
    centre-cropped cache entries identical to timm's eval transform of the file (see
    ``decode_square``). The file is filled under a temporary name and renamed when complete, so an
    interrupted build never leaves a cache that looks finished.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    final = cache_path(samples, size, cache_dir, crop, interpolation, squash)
    if final.exists():
        return np.load(final, mmap_mode="r")
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.npy")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(samples), size, size, 3))
        workers = max(1, default_workers(workers))
        paths = [sample.path for sample in samples]
        pool = ThreadPoolExecutor(workers)
        try:
            with progress_bar("Decoding images", len(paths)) as advance:
                for i, square in enumerate(pool.map(lambda p: decode_square(p, size, crop, interpolation, squash), paths)):
                    array[i] = square
                    advance()
        finally:  # on an error or Ctrl-C, drop the queued decodes instead of waiting for them
            pool.shutdown(cancel_futures=True)
        array.flush()
        del array
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(final, mmap_mode="r")
