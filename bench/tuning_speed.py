"""Seconds of a 50-trial linear study on cached codes, against plain scikit-learn fits in the same run.

The codes are a real dataset's (default: hymenoptera's penultimate EfficientNet-Lite0 codes),
extracted once through ``dataset_codes`` with a cache folder; a second call reads them back (its
time is the "codes again" row: a second fit does not extract). Then, on those codes:

1. reference: ``--trials`` fits of the untuned pipeline (``ShrunkScaler`` + LogisticRegression,
   C from the recipe's grid in turn) on the train codes, each scored on val: the plain recipe with
   no Optuna, no storage, no tracking; what the trials' arithmetic alone costs.
2. study: ``tune`` with ``--trials`` trials (trial 0 the recipe's CV choice, then seeded TPE over
   classifier and C), the study in SQLite in a temporary folder, no MLflow.
3. study + MLflow: the same with every trial a nested run under a real MLflow run (SQLite store).

Each row prints its seconds and its ratio to the reference. The acceptance of issue 5 is row 3
under 10 s for 50 trials. On a shared machine another job can double any figure.

Run from the repo root:  python bench/tuning_speed.py [--data ../shared/data/hymenoptera] [--trials 50]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from tlpipe.config import load_config
from tlpipe.data import prepare_dataset
from tlpipe.models import build_backbone, dataset_codes
from tlpipe.run.tracking import FitRun
from tlpipe.training.linear import linear_estimator
from tlpipe.tuning import linear_objective, tune

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/hymenoptera")
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no dataset at {args.data}: pass --data FOLDER (one subfolder per class)")

    config = load_config("default", strategy="linear")
    spec = prepare_dataset(args.data, config.val_fraction, config.seed, report_dir=None)
    backbone = build_backbone(config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows: dict[str, float] = {}
        start = time.perf_counter()
        codes = {split: dataset_codes(backbone, spec, split, config, cache=tmp / "cache") for split in ("train", "val")}
        rows["codes (extracted)"] = time.perf_counter() - start
        start = time.perf_counter()
        codes = {split: dataset_codes(backbone, spec, split, config, cache=tmp / "cache") for split in ("train", "val")}
        rows["codes again (cache)"] = time.perf_counter() - start
        (X, y), (X_val, y_val) = codes["train"], codes["val"]
        print(f"{args.data.name}: train {X.shape}, val {X_val.shape}")

        start = time.perf_counter()
        grid = config.linear.c_grid
        for i in range(args.trials):
            model = linear_estimator("logreg", grid[i % len(grid)], config.seed).fit(X, y)
            float(np.mean(model.predict(X_val) == y_val))
        reference = rows["reference: plain fits"] = time.perf_counter() - start

        start = time.perf_counter()
        tuned = tune(config, tmp / "study", linear_objective(codes), trials=args.trials)
        rows["study (SQLite, no MLflow)"] = time.perf_counter() - start
        assert len(tuned.study.trials) == args.trials

        with FitRun("tuning-speed", f"sqlite:///{tmp / 'mlflow.db'}") as run:
            start = time.perf_counter()
            tuned = tune(config, tmp / "study-mlflow", linear_objective(codes), parent=run, trials=args.trials)
            rows["study + MLflow nested runs"] = time.perf_counter() - start

    print(f"\n{'':32s} {'seconds':>8s} {'per trial':>10s} {'/ reference':>12s}")
    for name, seconds in rows.items():
        per_trial = f"{1000 * seconds / args.trials:8.1f}ms" if "codes" not in name else ""
        print(f"{name:32s} {seconds:8.2f} {per_trial:>10s} {seconds / reference:12.2f}")
    print(f"\nbest val accuracy {tuned.study.best_value:.4f} ({tuned.study.best_params}); "
          f"trial 0 {tuned.study.trials[0].value:.4f}")


if __name__ == "__main__":
    main()
