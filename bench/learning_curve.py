"""Does the learning curve's forecast hold? On each ``../shared/data`` set: the curve a fit draws
(``tlpipe.insight.learning_curve``) from half of train (a stratified half, three seeds) forecasts
val accuracy at twice that, the full train; the figure the full train actually gives is compared
with the forecast's 95% interval. The codes come from ``tlpipe extract`` (default recipe), once.

Run from the repo root:  python bench/learning_curve.py /tmp/curves   (about 2 min on 2 cores)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from shared_codes import train_val_codes



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from tlpipe.insight.label_issues import out_of_fold_probabilities
    from tlpipe.insight.learning_curve import learning_curve, nested_subsets
    from tlpipe.training.linear import accuracy, fit_head

    inside = 0
    for name in ("hymenoptera", "bloodcells", "dtd10", "rsscn7"):
        X, y, X_val, y_val = train_val_codes(name, args.out)
        _, C = out_of_fold_probabilities(X, y, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0))
        actual = accuracy(fit_head("logreg", C, X, y), X_val, y_val)
        for seed in range(3):
            half = nested_subsets(y, (0.5,), seed)[0]
            forecast = learning_curve(X[half], y[half], X_val, y_val, "logreg", C, seed).predicted["2x"]
            hit = forecast["low"] <= actual <= forecast["high"]
            inside += hit
            print(f"{name:12s} seed {seed}: from {len(half)} images, forecast for {forecast['images']}: "
                  f"{forecast['score']:.3f} ({forecast['low']:.3f}-{forecast['high']:.3f}); actual {actual:.3f} "
                  f"({len(y)} images) {'inside' if hit else 'OUTSIDE'}")
    print(f"{inside} of 12 forecasts hold the actual figure in their interval")


if __name__ == "__main__":
    main()
