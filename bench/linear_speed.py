"""Seconds of the linear classifiers' cross-validation path (``cv_path``), SVM against softmax and
against liblinear, on the same codes, folds and C grid, in the same run.

Three timings, BLAS on one thread as ``LinearProbe.fit`` runs them:

1. softmax: ``cv_path("logreg", ...)``, scikit-learn's LogisticRegression warm-started along C;
2. svm: ``cv_path("svm", ...)``, tlpipe's ``SquaredHingeSVC`` (L-BFGS in the Gram eigenbasis);
3. liblinear: scikit-learn's ``LinearSVC(dual=True)``, the same problem, on the same scaled folds,
   at the C values the SVM's path reached (``--no-liblinear`` skips it: it is the slow one).

Each prints its mean CV accuracy per C (-inf: the path stopped before it), so the three can be
seen to agree. The codes are the digits example's (``tlpipe fit --example digits``: 1437 train
images, 10 classes) unless ``--codes FILE`` names a cached ``.npz`` from a fit's ``cache/`` folder
(``codes/*.npz`` or ``signals/*.npz``).

Run from the repo root:  python bench/linear_speed.py [--recipe quick] [--codes FILE] [--no-liblinear]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from tlpipe.config import load_config
from tlpipe.training.linear import ShrunkScaler, cv_path


def digits_codes() -> tuple[np.ndarray, np.ndarray]:
    from tlpipe.data import prepare_dataset
    from tlpipe.examples import write_example
    from tlpipe.models import build_backbone, dataset_codes

    config = load_config("default")
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare_dataset(write_example("digits", Path(tmp)), config.val_fraction, config.seed, report_dir=None)
        return dataset_codes(build_backbone(config), spec, "train", config)


def saved_codes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    saved = np.load(path)
    return saved["features" if "features" in saved.files else "codes"], saved["labels"]


def liblinear_path(X, y, cv, grid) -> np.ndarray:
    folds = []
    for train, test in cv.split(X, y):
        scaler = ShrunkScaler().fit(X[train])
        folds.append((scaler.transform(X[train]), y[train], scaler.transform(X[test]), y[test]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return np.array([np.mean([LinearSVC(C=C, dual=True).fit(a, b).score(c, d) for a, b, c, d in folds]) for C in grid])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default", help="whose linear: c_grid and cv_folds")
    parser.add_argument("--codes", type=Path, help="a cached codes .npz instead of the digits example's")
    parser.add_argument("--no-liblinear", action="store_true")
    args = parser.parse_args()
    X, y = saved_codes(args.codes) if args.codes else digits_codes()
    X = X.astype(np.float64)
    linear = load_config(args.recipe).linear
    grid, cv = tuple(linear.c_grid), StratifiedKFold(linear.cv_folds, shuffle=True, random_state=0)
    print(f"codes {X.shape[0]} x {X.shape[1]}, {len(np.unique(y))} classes; {linear.cv_folds} folds; C {grid}\n")
    seconds, reached = {}, grid
    runs = [("softmax", lambda: cv_path("logreg", X, y, cv, grid, n_jobs=1)[0]),
            ("svm", lambda: cv_path("svm", X, y, cv, grid, n_jobs=1)[0])]
    if not args.no_liblinear:
        runs.append(("liblinear", lambda: liblinear_path(X, y, cv, reached)))
    for name, run in runs:
        with threadpool_limits(1):
            start = time.perf_counter()
            accuracies = run()
            seconds[name] = time.perf_counter() - start
        if name == "svm":
            reached = [C for C, accuracy in zip(grid, accuracies) if np.isfinite(accuracy)]
        print(f"{name:10s} {seconds[name]:7.2f} s  (x{seconds[name] / seconds['softmax']:.2f} the softmax)  "
              f"CV accuracy per C: {' '.join(f'{a:.4f}' for a in accuracies)}")


if __name__ == "__main__":
    main()
