"""What a fine-tuning study of each benchmark row would cost ``tlpipe fit`` here: the number
``--strategy auto`` weighs against the recipe's ``auto.finetune_minutes``.

For each row of ``bench/results/strategy_benchmark.jsonl`` (the same seeded train subsample and the
whole val split), the default recipe's frozen forward pass over both splits, exactly as the fit
runs it (``collect_splits``, the recipe's image size, batch size and workers), and from its
measured speed the worst case of the recipe's fine-tuning study (``finetune_study_seconds``: every
trial, every epoch). Written to ``bench/results/study_cost.jsonl``; ``bench/strategy_regret.py``
reads it to score the default recipe as it decides on this machine.

Run from the repo root:  python bench/study_cost.py   (about 8 minutes on 2 quiet CPU cores)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from strategy_benchmark import RESULTS, SHARED_DATA, subsample
from tlpipe.config import load_config
from tlpipe.data import prepare_dataset
from tlpipe.device import resolve_device
from tlpipe.models import build_backbone
from tlpipe.strategy.auto import finetune_study_seconds
from tlpipe.strategy.frozen_pass import collect_splits

STUDY_COST = RESULTS.with_name("study_cost.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=STUDY_COST)
    args = parser.parse_args()
    config = load_config(args.recipe)
    backbone = build_backbone(config)
    lines = []
    for line in args.results.read_text().splitlines():
        row = json.loads(line)
        spec = prepare_dataset(SHARED_DATA / row["dataset"], config.val_fraction, row["seed"], report_dir=None)
        train = subsample(spec.splits["train"], row["per_class"], row["seed"])
        sub = dataclasses.replace(spec, splits={"train": train, "val": spec.splits["val"]})
        features = collect_splits(backbone, sub, config)  # the fit's pass: its speed over both splits
        minutes = finetune_study_seconds(sub, config, features) / 60
        seconds = sum(f.seconds for f in features.values())
        cost = {"dataset": row["dataset"], "per_class": row["per_class"], "n_train": len(train),
                "n_val": len(sub.splits["val"]), "recipe": args.recipe, "device": str(resolve_device(config.device)),
                "forward_images_per_second": round((len(train) + len(sub.splits["val"])) / seconds, 2),
                "finetune_study_minutes": round(minutes, 1)}
        lines.append(json.dumps(cost))
        print(f"{row['dataset']:12s} {row['per_class']:4d}/class n={len(train):4d}: "
              f"{cost['forward_images_per_second']:6.1f} images/s, study at most {minutes:6.1f} min", flush=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
