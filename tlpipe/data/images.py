"""Decoding one image file into an RGB picture, the same way for checking, training and predicting.

Pillow does the work; this module only fixes what users' folders contain in practice: EXIF
rotation, grey / palette / CMYK / 16-bit / alpha modes, truncated files and decompression bombs.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

CHECK_SIDE = 1024  # the check decodes JPEGs no smaller: above any training size (each decode draws its own)
# Modes Pillow opens 16- or 32-bit single-channel images in; convert("RGB") would clip them white.
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_image_name(path: Path) -> bool:
    """True for file names with an image extension, in any letter case."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def content_hashes(paths: Sequence[str | Path]) -> list[str]:
    """Each file's bytes as a 128-bit BLAKE2b digest: an image is recognised under any name or folder
    (a copy of a train image in a "new" test folder), read by a few threads since the disk waits."""
    def digest(path: str | Path) -> str:
        hashed = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as file:
            while block := file.read(1 << 20):
                hashed.update(block)
        return hashed.hexdigest()

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(digest, paths))


def shorter_side(paths: list[Path]) -> int:
    """The median shorter side of ``paths`` (checked files), read from their headers alone."""
    sides = []
    for path in paths:
        with Image.open(path) as img:
            sides.append(min(img.size))
    return int(np.median(sides)) if sides else 0


def load_rgb(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB image, upright as its EXIF orientation says.

    ``min_size`` lets JPEG decoding shrink by a power of two while keeping both sides at least
    that large (Pillow's draft mode): several times faster on large photos, and the later resize
    happens anyway. Raises ``OSError`` / ``UnidentifiedImageError`` for unreadable or truncated
    files and ``Image.DecompressionBombError`` for images over Pillow's pixel limit.
    """
    with Image.open(path) as img:
        if min_size is not None and isinstance(img, JpegImageFile):  # a multi-picture phone JPEG (MPO) too
            img.draft("RGB", (min_size, min_size))
        _refuse_bomb(img)  # on the pixels decoded: a 108-megapixel photo drafted to the size used is no bomb
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def _refuse_bomb(img: Image.Image) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too. Checked here
    rather than with ``warnings.catch_warnings``, which is process-global and races across the
    checker's threads (letting a bomb through and leaking the filter)."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = img.width * img.height
    if limit and pixels > limit:
        raise Image.DecompressionBombError(
            f"Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be decompression bomb DOS attack."
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _WIDE_GREY_MODES:
        values = np.asarray(img, dtype=np.float64)
        # 16-bit range: scale to 8 bits instead of clipping. I;16 modes always (a dark 16-bit image
        # must not come out brighter than a light one); 32-bit modes when their values say so.
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour: lay the image on white, as a viewer shows it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def check_image(path: Path) -> str | None:
    """Decode ``path`` once (a JPEG at ``CHECK_SIDE`` at least, as training decodes it: every byte
    is still read); return why it cannot be used, or None when it is a good image."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        load_rgb(path, min_size=CHECK_SIDE)
    except UnidentifiedImageError:
        return "not an image Pillow can read (wrong extension or corrupt header)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"refused as a decompression bomb: {exc}"
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        return f"truncated or corrupt: {reason}"
    return None
