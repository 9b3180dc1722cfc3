"""How well does ``tlpipe fit`` find wrong labels, and does ``--exclude-label-issues`` pay?

For each dataset of ``../shared/data`` named: a table (``labels.csv``, outside the repo; the images
stay where they are, read through ``--root``) listing its train and val images with their split,
``--flip`` of the train labels changed at random to another class (seeded; val stays clean). Then
three real fits through the CLI, ``--strategy linear`` (the codes extracted once, a shared cache):
the clean table, the noisy one, the noisy one with ``--exclude-label-issues``. Prints the flagged
set's precision and recall against the flipped images, and the val accuracy of each fit: how much
the flips cost and how much of it excluding the suspects won back.

Run from the repo root:  python bench/label_noise.py /tmp/label_noise [dtd10 bloodcells] [--flip 0.1 --seed 0]
(about 2 min per dataset on 2 cores, most of it the first extraction).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def write_tables(name: str, out: Path, flip: float, seed: int) -> set[str]:
    """``out/clean.csv`` and ``out/noisy.csv`` of ``SHARED/name`` (path, label, split); returns the
    flipped paths."""
    root = SHARED / name
    rows = [(p.relative_to(root).as_posix(), p.parent.name, split) for split in ("train", "val")
            for p in sorted((root / split).glob("*/*")) if p.is_file()]
    classes = sorted({label for _, label, _ in rows})
    rng = np.random.default_rng(seed)
    train = [i for i, row in enumerate(rows) if row[2] == "train"]
    flipped = rng.choice(train, size=round(flip * len(train)), replace=False)
    noisy = list(rows)
    for i in flipped:
        path, label, split = rows[i]
        noisy[i] = (path, rng.choice([c for c in classes if c != label]), split)
    for table, content in (("clean", rows), ("noisy", noisy)):
        with (out / f"{table}.csv").open("w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("path", "label", "split"), *content])
    return {rows[i][0] for i in flipped}


def fit(out: Path, table: str, *extra: str, auto: bool = False) -> dict:
    """One ``tlpipe fit`` of ``out/<table>.csv`` (``--strategy linear``, or with ``auto`` the default
    policy's tap choice without a fine-tune); its summary."""
    folder = out / f"fit-{table}{'-excluded' if extra else ''}"
    command = [sys.executable, "-m", "tlpipe", "fit", str(out / f"{table}.csv"), "--root", str(SHARED / out.name),
               *([] if auto else ["--strategy", "linear"]), "-o", str(folder), "--overwrite",
               "--recipe", str(out.parent / "recipe.yaml"), *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((folder / "summary.json").read_text())


def flagged(summary: dict) -> set[str]:
    with (Path(summary["bundle"]).parent / "label_issues.csv").open(encoding="utf-8") as f:
        return {row["path"] for row in csv.DictReader(f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("datasets", nargs="*", default=["dtd10", "bloodcells"])
    parser.add_argument("--flip", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--auto", action="store_true", help="the default auto policy (its tap), never fine-tuning: "
                        "the suspects a default fit flags before it trains")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.yaml").write_text(f"cache_dir: {args.out / 'cache'}\n" + ("auto:\n  finetune_minutes: 0\n" if args.auto else ""))
    for name in args.datasets:
        out = args.out / name
        out.mkdir(exist_ok=True)
        truth = write_tables(name, out, args.flip, args.seed)
        clean, noisy = fit(out, "clean", auto=args.auto), fit(out, "noisy", auto=args.auto)
        excluded = fit(out, "noisy", "--exclude-label-issues", auto=args.auto)
        found = flagged(noisy)
        hits = len(found & truth)
        cost = clean["val_accuracy"] - noisy["val_accuracy"]
        won = excluded["val_accuracy"] - noisy["val_accuracy"]
        print(f"{name}: {len(truth)} of {noisy['splits']['train']} train labels flipped; flagged {len(found)}: "
              f"precision {hits / max(1, len(found)):.2f}, recall {hits / max(1, len(truth)):.2f}")
        print(f"  val accuracy: clean {clean['val_accuracy']:.3f}, noisy {noisy['val_accuracy']:.3f}, "
              f"noisy without suspects {excluded['val_accuracy']:.3f} "
              f"(won back {won / cost:.0%} of the {100 * cost:.1f} points lost)" if cost > 0 else
              f"  val accuracy: clean {clean['val_accuracy']:.3f}, noisy {noisy['val_accuracy']:.3f} (the flips cost nothing), "
              f"without suspects {excluded['val_accuracy']:.3f}")
        print(f"  stage: {json.dumps(excluded['label_issues'].get('excluded'))}")


if __name__ == "__main__":
    main()
