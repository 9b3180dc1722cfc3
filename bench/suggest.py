"""Do the images ``tlpipe suggest`` picks teach more than as many random ones?

On ``../shared/data`` sets (default bloodcells): 20% of train labelled (``--labelled``; stratified, per seed), the
rest an unlabelled pool. The linear classifier a fit would make (softmax regression, C by
cross-validation) is trained on the labelled part; ``tlpipe.insight.suggest`` picks ``--n`` images
of the pool from its probabilities and the codes, and so does chance. Each set is added (with its
true labels) and the classifier refitted: val accuracy of both, over five seeds (``--seeds``). Chance is the mean
of ``RANDOM_DRAWS`` draws a seed (one draw moves val accuracy by +-2 points on bloodcells, which is
more than the gap being measured). The codes come from ``tlpipe extract`` (default recipe; ``--layer``
the tap, e.g. ``penultimate+blocks.6``, the one a far-data fit picks), once.

Run from the repo root:  python bench/suggest.py /tmp/suggest [bloodcells dtd10] [--n 100] [--layer L] [--seeds 5]
[--labelled 0.2]  (about 2 min; the codes are extracted into the folder the first time)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from shared_codes import train_val_codes

RANDOM_DRAWS = 5
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("datasets", nargs="*", default=["bloodcells"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--layer", default="penultimate")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--labelled", type=float, default=0.2, help="share of train labelled at the start")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from tlpipe.insight.label_issues import out_of_fold_probabilities
    from tlpipe.insight.learning_curve import nested_subsets
    from tlpipe.insight.suggest import suggest
    from tlpipe.training.linear import accuracy, fit_head

    for name in args.datasets:
        X, y, X_val, y_val = train_val_codes(name, args.out, args.layer)
        figures = {"start": [], "suggested": [], "random": []}
        for seed in range(args.seeds):
            labelled = nested_subsets(y, (args.labelled,), seed)[0]
            pool = np.setdiff1d(np.arange(len(y)), labelled)
            C = out_of_fold_probabilities(X[labelled], y[labelled], GRID, seed)[1]
            head = fit_head("logreg", C, X[labelled], y[labelled], seed)
            picks = suggest(head.predict_proba(X[pool]), X[pool], args.n, X[labelled], seed=seed).rows
            chances = [np.random.default_rng([seed, draw]).choice(len(pool), args.n, replace=False)
                       for draw in range(RANDOM_DRAWS)]

            def val_with(rows: np.ndarray) -> float:
                grown = np.concatenate([labelled, pool[rows]])
                return accuracy(fit_head("logreg", C, X[grown], y[grown], seed), X_val, y_val)

            figures["start"].append(accuracy(head, X_val, y_val))
            figures["suggested"].append(val_with(picks))
            figures["random"].append(float(np.mean([val_with(rows) for rows in chances])))
            print(f"{name} seed {seed}: {len(labelled)} labelled, val {figures['start'][-1]:.3f}; +{args.n} suggested "
                  f"{figures['suggested'][-1]:.3f}, +{args.n} random {figures['random'][-1]:.3f}")
        means = {k: float(np.mean(v)) for k, v in figures.items()}
        gain = 100 * (np.array(figures["suggested"]) - figures["random"])
        print(f"{name} mean of {args.seeds} seeds ({args.labelled:.0%} labelled): start {means['start']:.3f}, +{args.n} suggested "
              f"{means['suggested']:.3f}, +{args.n} random {means['random']:.3f} (suggested - random: {gain.mean():+.2f} "
              f"+- {gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else float('nan'):.2f} points)")


if __name__ == "__main__":
    main()
