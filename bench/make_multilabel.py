"""Build a multi-label image set from dtd10's textures: each image a mosaic of 1 to 3 classes.

Every image is a ``--size`` square split into cells, each cell a seeded random crop (scale, position,
horizontal flip) of a dtd10 source photo of that cell's class; an image's labels are the distinct
classes in it, 1, 2 or 3 with equal odds:

- 1 label: one crop fills the tile;
- 2 labels: two halves (side by side or stacked);
- 3 labels: either a half plus two quarters, or a 2x2 grid of three classes and one repeat.

The layout is mirrored and transposed at random. Train mosaics use only dtd10's train/ photos and
val mosaics only its val/ photos, so no source photo is in both splits; no two images are the same
(a repeat is drawn again). The same seed gives the same files.

Writes ``OUT/images/<split>_NNNNN.jpg`` and ``OUT/labels.csv`` (columns ``path,labels,split``; path
relative to OUT, labels the sorted class names joined by ``;``), then prints the images and the
images per label count in each split, and how often each class occurs. OUT must be outside the repo.

Run from the repo root:  python bench/make_multilabel.py /tmp/ml [--train 1200 --val 400 --seed 0 --size 224]
(about 10 s for the default 1,600 images on one core; Pillow and numpy only).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DTD10 = REPO_ROOT.parent / "shared" / "data" / "dtd10"
HALF, QUARTERS = 0.5, [(0, 0), (0.5, 0), (0, 0.5), (0.5, 0.5)]


def sources(split: str) -> dict[str, list[Path]]:
    """Class name -> its source photos in dtd10's ``split`` folder."""
    return {d.name: sorted(d.glob("*.jpg")) for d in sorted((DTD10 / split).iterdir()) if d.is_dir()}


def layout(n_labels: int, rng: np.random.Generator) -> list[tuple[float, float, float, float, int]]:
    """Cells as (x, y, w, h, slot) in the unit square; slot i takes the mosaic's i-th class."""
    if n_labels == 1:
        cells = [(0, 0, 1, 1, 0)]
    elif n_labels == 2:
        cells = [(0, 0, HALF, 1, 0), (HALF, 0, HALF, 1, 1)]
    elif rng.random() < 0.5:  # a half and two quarters
        cells = [(0, 0, HALF, 1, 0), (HALF, 0, HALF, HALF, 1), (HALF, HALF, HALF, HALF, 2)]
    else:  # a 2x2 grid: three classes and one of them again
        slots = rng.permutation([0, 1, 2, int(rng.integers(3))])
        cells = [(x, y, HALF, HALF, int(s)) for (x, y), s in zip(QUARTERS, slots)]
    if rng.random() < 0.5:  # mirror
        cells = [(1 - x - w, y, w, h, s) for x, y, w, h, s in cells]
    if rng.random() < 0.5:  # transpose
        cells = [(y, x, h, w, s) for x, y, w, h, s in cells]
    return cells


def crop(photo: Image.Image, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` with the cell's aspect, 40-100 % of the largest such crop, maybe
    mirrored, resized to the cell."""
    scale = min(photo.width / width, photo.height / height) * rng.uniform(0.4, 1.0)
    w, h = round(width * scale), round(height * scale)
    x, y = int(rng.integers(photo.width - w + 1)), int(rng.integers(photo.height - h + 1))
    piece = photo.crop((x, y, x + w, y + h)).resize((width, height), Image.Resampling.BILINEAR)
    return piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else piece


def mosaic(photos: dict[str, list[Image.Image]], size: int, rng: np.random.Generator) -> tuple[Image.Image, list[str]]:
    """One mosaic and its sorted labels."""
    names = list(photos)
    n_labels = int(rng.integers(1, 4))
    classes = [names[i] for i in rng.choice(len(names), n_labels, replace=False)]
    image = Image.new("RGB", (size, size))
    for x, y, w, h, slot in layout(n_labels, rng):
        left, top = round(x * size), round(y * size)
        right, bottom = round((x + w) * size), round((y + h) * size)
        pool = photos[classes[slot]]
        image.paste(crop(pool[int(rng.integers(len(pool)))], right - left, bottom - top, rng), (left, top))
    return image, sorted(classes)


def build_split(split: str, count: int, out: Path, size: int, seed: int, seen: set[str]) -> list[tuple[str, str, str]]:
    """``count`` mosaics from dtd10's ``split`` photos, written under ``out/images``; their csv rows."""
    photos = {name: [Image.open(p).convert("RGB") for p in paths] for name, paths in sources(split).items()}
    rng = np.random.default_rng([seed, ["train", "val"].index(split)])  # a split's draws don't depend on the other's count
    rows = []
    while len(rows) < count:
        image, labels = mosaic(photos, size, rng)
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        path = f"images/{split}_{len(rows):05d}.jpg"
        image.save(out / path, quality=90)
        rows.append((path, ";".join(labels), split))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder, outside the repo")
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    out = args.out.resolve()
    if out.is_relative_to(REPO_ROOT):
        parser.error(f"{out} is inside the repo: write the set elsewhere (e.g. /tmp/ml)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    for old in (out / "images").glob("*.jpg"):  # a smaller re-run leaves no stale files behind
        old.unlink()

    seen: set[str] = set()
    rows = [row for split in ("train", "val") for row in build_split(split, getattr(args, split), out, args.size, args.seed, seen)]
    with open(out / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "labels", "split"), *rows])

    print(f"wrote {len(rows)} images and labels.csv to {out}")
    for split in ("train", "val"):
        labels = [r[1].split(";") for r in rows if r[2] == split]
        per_count = Counter(len(l) for l in labels)
        print(f"{split:5s} {len(labels):5d} images   labels per image: "
              + "  ".join(f"{k}: {per_count[k]}" for k in (1, 2, 3)))
        per_class = Counter(c for l in labels for c in l)
        print("      " + "  ".join(f"{c} {n}" for c, n in sorted(per_class.items())))


if __name__ == "__main__":
    main()
