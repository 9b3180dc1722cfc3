"""Regret of the automatic strategy choice against fixed policies, and the calibration of its thresholds.

Reads ``bench/results/strategy_benchmark.jsonl`` (run ``bench/strategy_benchmark.py`` first). On
each dataset x size row, a policy's regret is the best strategy's val accuracy minus the accuracy
of the strategy the policy picks, in accuracy points. Policies:

- ``always linear``: the linear classifier on the last stage;
- ``always linear, tap on val``: the best on val of the last stage, the best earlier stage and both;
- ``always full``: full fine-tuning (LP-FT);
- ``2x2 rule``: the notes' rule as written, with the similarity a person would give (the data
  README: hymenoptera near ImageNet, the others far) and "large" from 100 images per class:
  small+near linear, small+far linear on an earlier stage, large (near or far) full fine-tune;
- ``auto``: what ``tlpipe fit`` does: ``tlpipe.strategy.decision.decide`` on the row's signals; a
  linear decision keeps the better tap on val; a fine-tune decision is kept only if it beats that
  linear classifier by more than its standard error on val (``keep_finetune``, the guard).

Calibration: the thresholds of ``AutoConfig`` (images per class for "large"; BatchNorm gap and
ImageNet-head confidence for "far") are chosen on a grid (midpoints between observed values) to
minimise mean regret, then worst regret. ``auto (fitted)``
uses the thresholds fitted on all rows; ``auto (LODO)`` fits them on the other datasets and scores
the held-out one, an honest estimate for a dataset the thresholds never saw.

Run from the repo root:  python bench/strategy_regret.py [--results FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tlpipe.config import AutoConfig
from tlpipe.strategy.decision import DEFAULT_THRESHOLDS, decide, keep_finetune
from tlpipe.strategy.signals import Signals

RESULTS = Path(__file__).resolve().parent / "results" / "strategy_benchmark.jsonl"
NEAR_IMAGENET = {"hymenoptera"}  # the data README's own words: "near-ImageNet photos"
PLAIN_RULE_LARGE = 100


LINEAR_TAPS = ("linear", "linear_stage", "linear_concat")  # the taps a linear fit compares on val (tlpipe.pipeline)


def best_linear(row: dict) -> str:
    """The linear tap a fit keeps: the best on val of the last stage, the best earlier stage and the
    two side by side (the first listed wins a tie)."""
    taps = [name for name in LINEAR_TAPS if name in row["accuracy"]]
    return max(taps, key=lambda name: (row["accuracy"][name], -taps.index(name)))


def auto_accuracy(row: dict, thresholds: AutoConfig) -> tuple[str, float]:
    """What ``tlpipe fit`` does: decide on the row's signals; a linear decision fits both taps and
    keeps the better on val; a fine-tune stands only if it beats that linear classifier by more than
    its standard error on val (``keep_finetune``)."""
    signals = Signals(**row["signals"])
    decision = decide(signals, row["per_class_min"], thresholds)
    acc, name = row["accuracy"], best_linear(row)
    if decision.strategy != "linear" and keep_finetune(acc[decision.strategy], acc[name], row["n_val"]):
        name = decision.strategy
    return name, acc[name]


def plain_rule(row: dict) -> str:
    if row["per_class_min"] >= PLAIN_RULE_LARGE:
        return "full"
    return "linear" if row["dataset"] in NEAR_IMAGENET else "linear_stage"


def regrets(rows: list[dict], pick) -> np.ndarray:
    return np.array([100 * (max(r["accuracy"].values()) - r["accuracy"][pick(r)]) for r in rows])


def calibrate(rows: list[dict]) -> AutoConfig:
    """AutoConfig with the lowest (mean, worst) regret of ``auto`` over ``rows``."""
    sizes = sorted({r["per_class_min"] for r in rows}) + [10**9]
    gap_grid = _midpoints(r["signals"]["domain_gap"] for r in rows)
    confidence_grid = _midpoints(r["signals"]["imagenet_confidence"]["mean_max_prob"] for r in rows)
    best, best_key = DEFAULT_THRESHOLDS, (np.inf, np.inf)
    for large in sizes:
        for gap in gap_grid:
            for confidence in [0.0] + confidence_grid[1:]:  # 0: the confidence plays no part
                candidate = AutoConfig(large_per_class=large, far_gap=round(gap, 4), far_confidence=min(1.0, round(confidence, 4)))
                r = regrets(rows, lambda row: auto_accuracy(row, candidate)[0])
                key = (round(r.mean(), 6), r.max())
                if key < best_key:
                    best, best_key = candidate, key
    return best


def _midpoints(values) -> list[float]:
    """AutoConfig between consecutive observed values, plus one below and one above them all."""
    v = sorted(set(values))
    return [v[0] - 1e-3] + [(a + b) / 2 for a, b in zip(v, v[1:])] + [v[-1] + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines()]
    for r in rows:
        r["per_class_min"] = r["n_train"] // r["n_classes"]
    fitted = calibrate(rows)
    lodo = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        others = [r for r in rows if r["dataset"] != dataset]
        lodo[dataset] = calibrate(others) if others else DEFAULT_THRESHOLDS
    policies = {
        "always linear": lambda r: "linear",
        "always linear, tap on val": best_linear,
        "always full": lambda r: "full",
        "2x2 rule": plain_rule,
        "auto (shipped thresholds)":
            lambda r: auto_accuracy(r, DEFAULT_THRESHOLDS)[0],
        "auto (fitted)": lambda r: auto_accuracy(r, fitted)[0],
        "auto (LODO)": lambda r: auto_accuracy(r, lodo[r["dataset"]])[0],
    }
    print(f"{'dataset':12s} {'n/class':>7s} {'gap':>6s}  " + " ".join(f"{k:>12s}" for k in rows[0]["accuracy"])
          + "   auto(fitted)")
    for r in rows:
        chosen = auto_accuracy(r, fitted)[0]
        print(f"{r['dataset']:12s} {r['per_class_min']:7d} {r['signals']['domain_gap']:6.3f}  "
              + " ".join(f"{v:12.3f}" for v in r["accuracy"].values()) + f"   {chosen}")
    print(f"\nfitted thresholds: {fitted}")
    for dataset, t in lodo.items():
        print(f"  without {dataset:12s}: {t}")
    print(f"\n{'policy':42s} {'mean regret':>11s} {'worst':>7s}  (accuracy points, {len(rows)} rows)")
    for name, pick in policies.items():
        r = regrets(rows, pick)
        print(f"{name:42s} {r.mean():11.2f} {r.max():7.2f}")


if __name__ == "__main__":
    main()
