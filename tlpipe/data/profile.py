"""A dataset profile without any neural network: what a user should know before fitting.

Class balance, image sizes and greyscale share explain results (tiny or grey images starve an
ImageNet backbone); exact and near duplicates inflate accuracy when they straddle splits. All of
it comes from file bytes, image headers, a perceptual hash (pHash) and a 32x32 copy of each
image decoded small, so it takes seconds, and the dataset folder is only read.
"""
from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from tlpipe.data.dataset import DatasetSpec
from tlpipe.data.images import load_rgb
from tlpipe.progress import progress_bar
from tlpipe.utils import default_workers

# Near duplicates: a 256-bit pHash (hash_size 16) proposes pairs, a pixel check confirms them.
# Measured on the four shared datasets: JPEG re-saves (quality 30) and resizes (x0.5, x0.9) move a
# photo's hash by <= 16 bits (<= 36 for a few aerial scenes), while distinct photos stay >= 90
# apart and the look-alike blood-cell micrographs >= 48 (with a 64-bit pHash, cells of different
# classes came within 6 bits). 32 sits between. pHash alone also pairs pictures that share only a
# layout (DTD's vertical stripes of other colours and widths: 6-11 bits), so a pair must also
# match on a 32x32 grey copy: relative rms difference <= 0.3, where re-saves and resizes of photos
# stay <= 0.24 and the closest distinct pairs (micrographs, stripes) are >= 0.35.
NEAR_THRESHOLD = 32
# pHash reads a 64x64 copy: a smaller picture is blown up to it, and look-alikes then pass both checks
# (the digits example's 8x8 strokes drawn at 32 px: 24 "leaking" pairs of different handwriting).
# Below this side only byte-identical copies are duplicates.
NEAR_MIN_SIDE = 64
RELATIVE_RMS = 0.3  # rms difference of the grey copies / their larger spread (at least FLAT_SPREAD)
FLAT_SPREAD = 4.0  # grey levels: flat images compare by brightness, not by noise
THUMB = 32  # side of the copies the greyscale and pixel checks look at
SMALL_SIDE = 224  # the input side most ImageNet backbones were trained at
GREY_TOLERANCE = 8  # largest channel spread (0-255) still called grey, on the THUMB copy (JPEG chroma noise)
_SPLIT_ORDER = ["train", "val", "test"]  # leakage pairs name the earlier split first: "train/test"
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class DatasetProfile:
    """Per-split class counts, image sizes, greyscale share, duplicates and cross-split leakage."""

    images_per_class: dict[str, dict[str, int]]  # split -> class -> count
    imbalance_ratio: float  # largest / smallest class count in train
    image_sizes: dict  # {"width"|"height": {"min","median","max"}, "small_share": short side < SMALL_SIDE}
    greyscale_share: float
    exact_duplicates: list[list[str]]  # groups of relative paths with identical bytes
    near_duplicates: list[list[str]]  # connected groups within the pHash threshold, not all identical
    leakage: list[dict]  # {"a", "b", "splits": "train/val", "kind": "exact"|"near", "distance"}
    seconds: float

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class _ImageFacts:
    sha256: str
    size: tuple[int, int]  # upright width, height from the header
    grey: bool
    phash: np.ndarray  # 256 bits, packed into 32 bytes
    thumb: np.ndarray  # THUMB x THUMB grey, float32


def _image_facts(path: Path) -> _ImageFacts:
    """Bytes digest, header size, greyscale flag and pHash of one image file."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation turns it a quarter
            width, height = height, width
        mode = img.mode
    rgb = load_rgb(path, min_size=128)  # JPEG draft: pHash looks at 64x64 anyway
    small = rgb.resize((THUMB, THUMB), Image.Resampling.BOX)
    grey_mode = _looks_grey(mode, small)
    packed = np.packbits(imagehash.phash(rgb, hash_size=16).hash.ravel())
    thumb = np.asarray(small.convert("L"), dtype=np.float32)
    return _ImageFacts(digest, (width, height), grey_mode, packed, thumb)


def _looks_grey(mode: str, small: Image.Image) -> bool:
    """A grey file mode, or RGB pixels whose channels hardly differ (``small``: a THUMB copy)."""
    if mode in _GREY_MODES:
        return True
    channels = np.asarray(small, dtype=np.int16)
    return int((channels.max(axis=2) - channels.min(axis=2)).max()) <= GREY_TOLERANCE


def greyscale_share(paths: list[Path]) -> float:
    """The share of ``paths`` (checked image files) whose pixels are grey."""
    grey = 0
    for path in paths:
        with Image.open(path) as img:
            mode = img.mode
        grey += _looks_grey(mode, load_rgb(path, min_size=THUMB).resize((THUMB, THUMB), Image.Resampling.BOX))
    return grey / max(len(paths), 1)


def _same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two grey thumbnails differ by little next to their own contrast."""
    rms = float(np.sqrt(np.mean((a - b) ** 2)))
    return rms <= RELATIVE_RMS * max(float(a.std()), float(b.std()), FLAT_SPREAD)


def _close_pairs(hashes: np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for i < j with Hamming distance <= threshold, in that order, by faiss's
    exact binary range search (``hashes``: packed bits, a row an image): popcounts in C, every
    pair still compared, but 70,000 images of 256 bits take 6 s on 2 cores; the BLAS product of
    the bits as +-1 it replaced took 8 s at 20,000 (about 100 s at 70,000, by its n^2)."""
    import faiss

    hashes = np.ascontiguousarray(hashes, dtype=np.uint8)
    index = faiss.IndexBinaryFlat(hashes.shape[1] * 8)
    index.add(hashes)
    limits, distances, neighbours = index.range_search(hashes, threshold + 1)  # its radius is strict
    rows = np.repeat(np.arange(len(hashes)), np.diff(limits).astype(np.int64))
    keep = neighbours > rows
    order = np.lexsort((neighbours[keep], rows[keep]))
    return list(zip(rows[keep][order].tolist(), neighbours[keep][order].tolist(), distances[keep][order].tolist()))


def _components(n: int, edges: list[tuple[int, int, int]]) -> list[list[int]]:
    """Connected components with more than one member (union-find)."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in edges:
        parent[find(i)] = find(j)
    groups = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def _size_summary(sizes: list[tuple[int, int]]) -> dict:
    """Min, median and max of widths and heights, and the share whose short side is under SMALL_SIDE."""
    arr = np.array(sizes)
    stats = {
        name: {"min": int(arr[:, k].min()), "median": float(np.median(arr[:, k])), "max": int(arr[:, k].max())}
        for k, name in enumerate(("width", "height"))
    }
    return {**stats, "small_share": float((arr.min(axis=1) < SMALL_SIDE).mean())}


def profile_dataset(
    spec: DatasetSpec, workers: int | None = None, near_threshold: int = NEAR_THRESHOLD
) -> DatasetProfile:
    """Profile every image of ``spec`` (all splits) with a thread pool (Pillow releases the GIL).
    ``near_threshold``: largest pHash Hamming distance, of 256 bits, between near duplicates."""
    started = time.perf_counter()
    entries = [(split, s.path) for split, samples in spec.splits.items() for s in samples]
    workers = max(1, default_workers(workers))
    with ThreadPoolExecutor(workers) as pool, progress_bar("Profiling images", len(entries)) as advance:
        facts = []
        for fact in pool.map(_image_facts, [p for _, p in entries]):
            facts.append(fact)
            advance()
    names = [spec.relative(p) for _, p in entries]

    by_digest = defaultdict(list)
    for i, fact in enumerate(facts):
        by_digest[fact.sha256].append(i)
    exact = [g for g in by_digest.values() if len(g) > 1]

    pairs = [
        (i, j, d) for i, j, d in _close_pairs(np.stack([f.phash for f in facts]), near_threshold)
        if facts[i].sha256 == facts[j].sha256
        or (min(*facts[i].size, *facts[j].size) >= NEAR_MIN_SIDE and _same_pixels(facts[i].thumb, facts[j].thumb))
    ]
    near_edges = [(i, j, d) for i, j, d in pairs if facts[i].sha256 != facts[j].sha256]
    same_bytes = [(g[0], k, 0) for g in exact for k in g[1:]]
    near = [g for g in _components(len(facts), near_edges + same_bytes) if len({facts[i].sha256 for i in g}) > 1]

    leakage = []
    for i, j, d in pairs:
        if entries[i][0] != entries[j][0]:
            i, j = sorted((i, j), key=lambda k: (_SPLIT_ORDER.index(entries[k][0]), names[k]))
            kind = "exact" if facts[i].sha256 == facts[j].sha256 else "near"
            splits = f"{entries[i][0]}/{entries[j][0]}"
            leakage.append({"a": names[i], "b": names[j], "splits": splits, "kind": kind, "distance": d})

    train = spec.class_counts("train").values()
    return DatasetProfile(
        images_per_class={split: spec.class_counts(split) for split in spec.splits},
        imbalance_ratio=max(train) / min(train),
        image_sizes=_size_summary([f.size for f in facts]),
        greyscale_share=float(np.mean([f.grey for f in facts])),
        exact_duplicates=sorted(sorted(names[i] for i in g) for g in exact),
        near_duplicates=sorted(sorted(names[i] for i in g) for g in near),
        leakage=sorted(leakage, key=lambda r: (r["splits"], r["a"], r["b"])),
        seconds=time.perf_counter() - started,
    )
