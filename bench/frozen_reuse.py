"""What running a partial fine-tune's frozen stages once saves: ``fit_finetune`` (strategy partial)
with its frozen-stage outputs reused, against the same fine-tune that runs every image through every
stage (the reference, measured in the same run), with the recipe's augmentation and with it off.

Each row trains ``--epochs`` epochs from the pretrained backbone in a fresh folder (the decoded-image
cache is built first and not timed) and prints the best epoch's seconds, ``ratio`` = plain/reused
(above 1: reuse is faster), and whether both reach the same val accuracy (they must: same maths).

Run from the repo root:  python bench/frozen_reuse.py [--data ../shared/data/hymenoptera] [--unfreeze 2]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tlpipe.config import load_config
from tlpipe.data import prepare_dataset
from tlpipe.models import PENULTIMATE, build_backbone, dataset_codes
from tlpipe.training import frozen
from tlpipe.training.fits import fit_finetune

REPO_ROOT = Path(__file__).resolve().parent.parent
AUGMENT_OFF = {"crop_scale": [1.0, 1.0], "hflip": 0, "vflip": 0, "affine_p": 0, "color_p": 0}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/hymenoptera")
    parser.add_argument("--unfreeze", type=int, default=2, help="stages trained (the rest frozen)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    return parser.parse_args()


def run(args, augment: dict, reuse: bool, work: Path, codes=None) -> dict:
    config = load_config("default", strategy="partial", image_size=args.image_size, augment=augment,
                         finetune={"epochs": args.epochs, "unfreeze_stages": args.unfreeze, "patience": args.epochs})
    spec = prepare_dataset(args.data)
    backbone = build_backbone(config)
    codes = codes or {split: dataset_codes(backbone, spec, split, config, PENULTIMATE) for split in ("train", "val")}
    find = frozen.FrozenPrefix.find
    if not reuse:
        frozen.FrozenPrefix.find = classmethod(lambda cls, *a: None)
    try:
        trained = fit_finetune(backbone, spec, config.model_copy(update={"cache_dir": str(work / "cache")}),
                               work / f"{reuse}-{bool(augment)}", codes)
    finally:
        frozen.FrozenPrefix.find = find
    return {"seconds": min(e["epoch_seconds"] for e in trained.history[1:] or trained.history),
            "accuracy": trained.details["val_accuracy"], "reused": trained.details["frozen_outputs_reused"], "codes": codes}


def main() -> None:
    args = parse_args()
    print(f"{args.data.name}: partial fine-tune, {args.unfreeze} stages trained, {args.image_size} px, best of epochs 2-{args.epochs}")
    print(f"{'augmentation':<14}{'plain s/epoch':>14}{'reused s/epoch':>15}{'ratio':>7}  reused  same accuracy")
    with tempfile.TemporaryDirectory() as tmp:
        codes = None
        for label, augment in (("recipe's", {}), ("off", AUGMENT_OFF)):
            plain = run(args, augment, False, Path(tmp), codes)
            codes = plain["codes"]
            reused = run(args, augment, True, Path(tmp), codes)
            print(f"{label:<14}{plain['seconds']:>14.2f}{reused['seconds']:>15.2f}{plain['seconds'] / reused['seconds']:>7.2f}"
                  f"  {'+'.join(reused['reused']):<7} {abs(plain['accuracy'] - reused['accuracy']) < 1e-9}"
                  f" ({reused['accuracy']:.4f})")


if __name__ == "__main__":
    main()
