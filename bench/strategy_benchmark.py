"""The benchmark the automatic strategy choice is calibrated on: every strategy, on every dataset
of ``../shared/data`` subsampled to several images per class, with its transfer signals.

For each dataset x size (train: that many images per class, drawn with the seed; val: the
dataset's own val/ folder, always whole, so every size is scored on the same images) it records:

- the transfer signals of the train images (``tlpipe.strategy.signals``: per-stage probes, kNN,
  LogME, the BatchNorm domain gap, ImageNet-head confidence), from one forward pass;
- the val accuracy of each strategy under the same small budget: ``linear`` (softmax/SVM with C
  chosen by cross-validation on the penultimate codes), ``linear_stage`` (the same on the earlier
  stage the signals rank best), ``partial`` (last 2 stages + head) and ``full`` (LP-FT), both
  fine-tunes for ``--epochs`` epochs with early stopping, at the two learning-rate settings of
  ``FINETUNE_BUDGET`` (the better one counts);
- the standard error of the linear probe's val accuracy, which the fine-tuning guard uses.

Rows are appended to ``bench/results/strategy_benchmark.jsonl`` as they finish; a re-run skips
the rows already there, so a killed benchmark resumes. ``bench/strategy_regret.py`` reads it.

Run from the repo root:  python bench/strategy_benchmark.py [--sizes 5 20 50 0] [--epochs 5]
(size 0 means all images). About 40 minutes on 2 quiet CPU cores at 160 px.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from tlpipe.config import load_config
from tlpipe.data import prepare_dataset
from tlpipe.models import build_backbone
from tlpipe.strategy.decision import standard_error
from tlpipe.strategy.frozen_pass import collect_features
from tlpipe.strategy.signals import compute_signals
from tlpipe.training.fits import fit_finetune, linear_probe

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS = REPO_ROOT / "bench" / "results" / "strategy_benchmark.jsonl"
DATASETS = ["hymenoptera", "bloodcells", "dtd10", "rsscn7"]
# The fine-tunes' small tuning budget: two (head LR, backbone multiplier) settings, the better kept.
# The linear strategies get theirs from cross-validating C over the recipe's grid.
FINETUNE_BUDGET = [(1e-4, 0.3), (1e-3, 0.5)]


def subsample(samples: list, per_class: int, seed: int) -> list:
    """``per_class`` samples of each class (all when 0 or when a class has fewer), seeded."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted({s.label for s in samples}):
        members = [s for s in samples if s.label == label]
        take = len(members) if per_class <= 0 else min(per_class, len(members))
        chosen += [members[i] for i in sorted(rng.choice(len(members), take, replace=False))]
    return chosen


def run_row(dataset: str, per_class: int, args) -> dict:
    config = load_config("default", strategy="linear", image_size=args.image_size, seed=args.seed,
                         finetune={"epochs": args.epochs, "patience": 3})
    spec = prepare_dataset(SHARED_DATA / dataset, config.val_fraction, config.seed, report_dir=None)
    train = subsample(spec.splits["train"], per_class, args.seed)
    sub = dataclasses.replace(spec, splits={"train": train, "val": spec.splits["val"]})
    row = {"dataset": dataset, "per_class": per_class, "n_train": len(train), "n_val": len(sub.splits["val"]),
           "n_classes": len(spec.classes), "image_size": args.image_size, "epochs": args.epochs, "seed": args.seed}

    backbone = build_backbone(config)
    features = {split: collect_features(backbone, sub.splits[split], config) for split in ("train", "val")}
    signals = compute_signals(features["train"], seed=args.seed)
    row["signals"] = signals.to_dict()
    row["seconds"] = {"forward_train": features["train"].seconds, "signals": signals.seconds}

    codes = {split: (f.codes, f.labels) for split, f in features.items()}
    accuracy, seconds = {}, row["seconds"]
    row["concat_stage"] = signals.best_stage  # the product's concatenated tap (Assessment.linear_taps)
    for name, X, X_val in [
        ("linear", features["train"].codes, features["val"].codes),
        ("linear_stage", features["train"].stages.get(signals.best_stage, features["train"].codes),
         features["val"].stages.get(signals.best_stage, features["val"].codes)),
        ("linear_concat", *(np.hstack([f.codes, f.stages[signals.best_stage]]) for f in (features["train"], features["val"]))),
    ]:
        t = time.perf_counter()
        probe = linear_probe(config, X, features["train"].labels, X_val, features["val"].labels)
        accuracy[name], seconds[name] = probe.candidates_[probe.chosen_]["val_accuracy"], time.perf_counter() - t
    row["linear_se"] = standard_error(accuracy["linear"], row["n_val"])

    row["finetune_runs"] = {}
    for strategy in ("partial", "full"):
        t = time.perf_counter()
        for lr, mult in FINETUNE_BUDGET:
            finetune = config.finetune.model_copy(update={"lr": lr, "backbone_lr_mult": mult})
            ft_config = config.model_copy(update={"strategy": strategy, "finetune": finetune,
                                                  "cache_dir": str(args.cache / dataset)})
            with tempfile.TemporaryDirectory() as out:
                trained = fit_finetune(build_backbone(ft_config), sub, ft_config, Path(out), codes)
            # the best epoch is the one a fit keeps
            row["finetune_runs"][f"{strategy}_lr{lr:g}_x{mult:g}"] = max(h["val_accuracy"] for h in trained.history)
        accuracy[strategy] = max(v for k, v in row["finetune_runs"].items() if k.startswith(strategy))
        seconds[strategy] = time.perf_counter() - t
    row["accuracy"] = accuracy
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[5, 20, 50, 0], help="images per class; 0: all")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tlpipe-bench-cache")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        raise SystemExit(f"the benchmark needs the datasets in {SHARED_DATA}")

    done = set()
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            row = json.loads(line)
            done.add((row["dataset"], row["n_train"], row["image_size"], row["epochs"], row["seed"]))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        spec = prepare_dataset(SHARED_DATA / dataset, 0.2, args.seed, report_dir=None)
        sizes, seen = [], set()
        for per_class in args.sizes:  # a size at or above the smallest class is "all": run it once
            n = len(subsample(spec.splits["train"], per_class, args.seed))
            if n not in seen:
                seen.add(n)
                sizes.append((per_class, n))
        for per_class, n in sizes:
            if (dataset, n, args.image_size, args.epochs, args.seed) in done:
                continue
            row = run_row(dataset, per_class, args)
            with args.results.open("a") as f:  # one line per row: a killed run loses at most the row in progress
                f.write(json.dumps(row) + "\n")
            acc = row["accuracy"]
            print(f"{dataset:12s} {per_class:4d}/class n={row['n_train']:4d} gap={row['signals']['domain_gap']:.3f} "
                  + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)


if __name__ == "__main__":
    main()
