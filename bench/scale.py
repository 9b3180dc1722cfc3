"""How a fit's cost grows with the image count: the same fit on nested stratified subsets of a large
set, each stage's seconds and the fit's peak memory (PSS), and the fitted exponent per stage (log-log slope).

The large set is built here from real pixels, outside the repo (``--data``, made once): seeded
random crops (30-100% of the side), scales and flips of the ``../shared/data`` photos (dtd10,
rsscn7 and bloodcells: 21 classes), each labelled by its source photo's class, saved as ``--side``
px JPEGs; train images come from the sources' train/ photos, val from their val/ photos, so no source
photo is in both. The same seed gives the same files; no two files are equal (a repeat is drawn again).
The subsets are nested (each holds the smaller ones) and stratified, written as hard links (tlpipe
skips symbolic links that leave the dataset's folder).

Run from the repo root (one at a time: on 2 cores a second job doubles every timing):
    python bench/scale.py --sizes 1000 5000 20000 70000 --time-limit 15m [--data /tmp/tlpipe-scale]
Prints one row per size (images, seconds per stage, wall seconds, peak memory MB, val accuracy, images
the fit used), the exponent of each stage between the smallest and largest size, and writes
``scale.png`` (log-log) beside --data. Peak memory is the largest proportional set size (PSS) of the
fit process and its children together (``/proc``, sampled every 0.2 s): the memory they hold, pages
the forked loader workers share counted once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = ("dtd10", "rsscn7", "bloodcells")


def source_photos(split: str) -> dict[str, list[Path]]:
    """Class (prefixed by its dataset) -> its photos in ``split`` of each source dataset."""
    return {f"{name}-{d.name}": sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            for name in SOURCES for d in sorted((SHARED / name / split).iterdir()) if d.is_dir()}


def build(root: Path, n_train: int, n_val: int, side: int, seed: int) -> None:
    """``root/{train,val}/<class>/<k>.jpg``: random crops of the source photos, classes in turn."""
    if (root / ".complete").exists():
        return
    rng, seen = np.random.default_rng(seed), set()
    for split, n in (("train", n_train), ("val", n_val)):
        photos = source_photos(split)
        classes = sorted(photos)
        cache: dict[Path, Image.Image] = {}
        for k in range(n):
            name = classes[k % len(classes)]
            while True:
                path = photos[name][rng.integers(len(photos[name]))]
                picture = cache.setdefault(path, ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
                w, h = picture.size
                crop = int(min(w, h) * rng.uniform(0.3, 1.0))
                x, y = rng.integers(0, w - crop + 1), rng.integers(0, h - crop + 1)
                tile = picture.crop((x, y, x + crop, y + crop)).resize((side, side), Image.BILINEAR)
                if rng.random() < 0.5:
                    tile = tile.transpose(Image.FLIP_LEFT_RIGHT)
                digest = hashlib.sha1(tile.tobytes()).digest()
                if digest not in seen:
                    seen.add(digest)
                    break
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            tile.save(folder / f"{k:06d}.jpg", quality=90)
    (root / ".complete").touch()


def subset(root: Path, size: int, seed: int) -> Path:
    """A tree of hard links to a stratified ``size`` images of ``root`` (train and val in proportion),
    nested: a smaller subset's images are all in a larger one."""
    target = root.parent / f"{root.name}-{size}"
    if target.exists():
        return target
    total = sum(1 for _ in root.glob("*/*/*.jpg"))
    for split in ("train", "val"):
        for folder in sorted((root / split).iterdir()):
            files = sorted(folder.glob("*.jpg"))
            order = np.random.default_rng([seed, int(hashlib.sha1(folder.name.encode()).hexdigest()[:8], 16)]).permutation(len(files))
            keep = max(2, round(len(files) * size / total))
            (target / split / folder.name).mkdir(parents=True)
            for i in order[:keep]:
                os.link(files[i], target / split / folder.name / files[i].name)
    return target


def memory_mb(pid: int) -> tuple[float, float]:
    """The proportional set size (PSS) of ``pid`` alone and with its descendants, in MB (``/proc/*/smaps_rollup``):
    pages shared by the loader workers forked from the fit count once, not once a process as RSS would."""
    sizes, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
            sizes.append(next(int(line.split()[1]) for line in rollup if line.startswith("Pss:")) * 1024 / 2**20)
            stack.extend(int(c) for t in Path(f"/proc/{p}/task").iterdir() for c in (t / "children").read_text().split())
        except (OSError, ValueError, StopIteration):
            continue
    return (sizes[0] if sizes else 0.0), sum(sizes)


def timed_fit(data: Path, out: Path, time_limit: str) -> dict:
    """One ``tlpipe fit`` (default recipe, this time limit): its summary's timings, wall seconds, peak PSS.
    Writes ``memory-<folder>.tsv`` beside ``out``: seconds, PSS of the fit process alone and with its
    workers (MB), and the fit's last line on stderr then (where the memory went, stage by stage)."""
    shutil.rmtree(out, ignore_errors=True)  # a fresh folder: no codes or decoded images cached by an earlier run
    start, peak, timeline, said = time.monotonic(), 0.0, [], [""]
    # The fit's announcements as a terminal gets them (rich: TTY_COMPATIBLE), without animation or colour
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent / 'mlflow.db'}",
           "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0", "NO_COLOR": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tlpipe", "fit", str(data), "-o", str(out), "--time-limit", time_limit],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True, errors="replace")
    reader = threading.Thread(target=lambda: said.extend(line.strip() for line in process.stderr), daemon=True)
    reader.start()
    while process.poll() is None:
        alone, total = memory_mb(process.pid)
        peak = max(peak, total)
        timeline.append(f"{time.monotonic() - start:.1f}\t{alone:.0f}\t{total:.0f}\t{said[-1][:120]}")
        time.sleep(0.2)
    wall = time.monotonic() - start
    reader.join(timeout=5)
    (out.parent / f"memory-{out.name}.tsv").write_text("seconds\tfit_mb\ttotal_mb\tlast_line\n" + "\n".join(timeline) + "\n")
    if process.returncode != 0:
        raise SystemExit(f"fit of {data} failed: " + "\n".join(said[-20:]))
    summary = json.loads((out / "summary.json").read_text())
    return {"wall": wall, "peak_mb": peak, "timings": summary["timings"], "val": summary["metrics"]["accuracy"],
            "used": sum(summary["splits"].values()), "strategy": summary["strategy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 70000])
    parser.add_argument("--time-limit", default="15m")
    parser.add_argument("--data", type=Path, default=Path("/tmp/tlpipe-scale/large"))
    parser.add_argument("--set-size", type=int, default=70000, help="images in the large set built once (train 6/7, val 1/7)")
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    largest = args.set_size
    build(args.data, int(largest * 6 / 7), largest - int(largest * 6 / 7), args.side, args.seed)
    rows = {}
    for size in sorted(args.sizes):
        data = subset(args.data, size, args.seed) if size < largest else args.data
        rows[size] = timed_fit(data, args.data.parent / f"fit-{size}", args.time_limit)
        r = rows[size]
        print(f"{size:>7} images: wall {r['wall']:.0f} s, peak PSS {r['peak_mb']:.0f} MB, val {r['val']:.3f} ({r['strategy']}, "
              f"{r['used']} images used); " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()), flush=True)
    small, large = min(rows), max(rows)
    if small == large:
        return
    print(f"exponents between {small} and {large} images (log-log slope of seconds):")
    for stage in rows[large]["timings"]:
        a, b = rows[small]["timings"].get(stage), rows[large]["timings"][stage]
        if a and b and a > 0.05:
            print(f"  {stage:16s} {np.log(b / a) / np.log(large / small):.2f}")
    print(f"  {'wall':16s} {np.log(rows[large]['wall'] / rows[small]['wall']) / np.log(large / small):.2f}")
    _plot(rows, args.data.parent / "scale.png")


def _plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(rows)
    figure, axes = plt.subplots(figsize=(7, 5))
    for stage in rows[sizes[-1]]["timings"]:
        axes.loglog(sizes, [max(rows[s]["timings"].get(stage, 0), 1e-2) for s in sizes], marker="o", label=stage)
    axes.loglog(sizes, [rows[s]["wall"] for s in sizes], "k--", marker="s", label="wall")
    axes.set_xlabel("images"), axes.set_ylabel("seconds"), axes.legend(fontsize=7)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
