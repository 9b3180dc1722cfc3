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
- ``auto``: what ``tlpipe fit`` does: ``tlpipe.strategy.decision.decide`` on the row's signals and
  the worst case of the default recipe's fine-tuning study of the row as the fit estimates it on
  this machine (``bench/study_cost.py``; or none, where fine-tuning is cheap as on a GPU); a linear decision keeps the better tap on val; a
  fine-tune decision is kept only if it beats that linear classifier by more than its standard
  error on val (``keep_finetune``, the guard).

Calibration, accuracy first: the size and distance thresholds of ``AutoConfig`` (images per class
for "large", near and far; BatchNorm gap and ImageNet-head confidence for "far") are chosen on a grid
(midpoints between observed values) to minimise mean regret, then worst regret, cost left out.
``auto (fitted)`` uses the thresholds fitted on all rows; ``auto (LODO)`` fits them on the other
datasets and scores the held-out one, an honest estimate for a dataset the thresholds never saw.
The cost side: the default recipe's regret and fine-tune count for a range of ``finetune_minutes``
budgets at this machine's speed (the cost/regret front a CPU user chooses on).

Run from the repo root:  python bench/strategy_regret.py [--results FILE]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tlpipe.config import AutoConfig, load_config
from tlpipe.strategy.decision import DEFAULT_THRESHOLDS, decide, keep_finetune
from tlpipe.strategy.signals import Signals

RECIPES = {name: load_config(name).auto for name in ("default", "quick", "best")}  # the thresholds shipped
BUDGETS = (0, 5, 10, 15, 20, 25, 30, 45, 60, 90)  # finetune_minutes on the cost/regret front
RESULTS = Path(__file__).resolve().parent / "results" / "strategy_benchmark.jsonl"
STUDY_COST = RESULTS.with_name("study_cost.jsonl")
NEAR_IMAGENET = {"hymenoptera"}  # the data README's own words: "near-ImageNet photos"
PLAIN_RULE_LARGE = 100


LINEAR_TAPS = ("linear", "linear_stage", "linear_concat")  # the taps a linear fit compares on val (tlpipe.pipeline)


def best_linear(row: dict) -> str:
    """The linear tap a fit keeps: the best on val of the last stage, the best earlier stage and the
    two side by side (the first listed wins a tie)."""
    taps = [name for name in LINEAR_TAPS if name in row["accuracy"]]
    return max(taps, key=lambda name: (row["accuracy"][name], -taps.index(name)))


def load_study_minutes(path: Path) -> dict[tuple[str, int], float]:
    """Per (dataset, images per class), the worst case of the default recipe's fine-tuning study
    that ``tlpipe fit`` estimates on this machine (``bench/study_cost.py``)."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run python bench/study_cost.py first")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {(r["dataset"], r["per_class"]): r["finetune_study_minutes"] for r in rows}


def auto_choice(row: dict, thresholds: AutoConfig, minutes=None) -> tuple[str, bool]:
    """What ``tlpipe fit`` ends with, and whether it trained a fine-tune to get there: decide on the
    row's signals and ``minutes(row)`` (the study's worst case; None: unknown, the size cuts alone);
    a linear decision fits the taps and keeps the best on val; a fine-tune stands only if it beats
    that linear classifier by more than its standard error on val (``keep_finetune``)."""
    decision = decide(Signals(**row["signals"]), row["per_class_min"], thresholds, minutes(row) if minutes else None)
    acc, name = row["accuracy"], best_linear(row)
    if decision.strategy == "linear":
        return name, False
    return (decision.strategy if keep_finetune(acc[decision.strategy], acc[name], row["n_val"]) else name), True


def plain_rule(row: dict) -> tuple[str, bool]:
    if row["per_class_min"] >= PLAIN_RULE_LARGE:
        return "full", True
    return ("linear" if row["dataset"] in NEAR_IMAGENET else "linear_stage"), False


def regrets(rows: list[dict], pick) -> tuple[np.ndarray, int]:
    """Per row, the best accuracy minus that of ``pick(row)``'s choice, in points; and how many rows
    the policy fine-tuned on (its cost: a fine-tune takes minutes where a linear fit takes seconds)."""
    chosen = [pick(r) for r in rows]
    points = np.array([100 * (max(r["accuracy"].values()) - r["accuracy"][name]) for r, (name, _) in zip(rows, chosen)])
    return points, sum(finetuned for _, finetuned in chosen)


def calibrate(rows: list[dict]) -> AutoConfig:
    """The thresholds with the lowest mean regret of ``auto`` over ``rows``, then the lowest worst
    regret, then the fewest fine-tunes (among equals, the cheaper)."""
    sizes = sorted({r["per_class_min"] for r in rows}) + [10**9]
    gap_grid = _midpoints(r["signals"]["domain_gap"] for r in rows)
    confidence_grid = _midpoints(r["signals"]["imagenet_confidence"]["mean_max_prob"] for r in rows)
    best, best_key = DEFAULT_THRESHOLDS, (np.inf, np.inf, np.inf)
    for large in sizes:
        for far_large in [size for size in sizes if size <= large]:
            for gap in gap_grid:
                for confidence in [0.0] + confidence_grid[1:]:  # 0: the confidence plays no part
                    candidate = AutoConfig(large_per_class=large, far_large_per_class=far_large, far_gap=round(gap, 4),
                                           far_confidence=min(1.0, round(confidence, 4)))
                    r, finetunes = regrets(rows, lambda row, c=candidate: auto_choice(row, c))
                    key = (round(r.mean(), 6), round(r.max(), 6), finetunes)
                    if key < best_key:
                        best, best_key = candidate, key
    return best


def _midpoints(values) -> list[float]:
    """Thresholds between consecutive observed values, plus one below and one above them all."""
    v = sorted(set(values))
    return [v[0] - 1e-3] + [(a + b) / 2 for a, b in zip(v, v[1:])] + [v[-1] + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--study-cost", type=Path, default=STUDY_COST)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.results.read_text().splitlines()]
    study_minutes = load_study_minutes(args.study_cost)
    for r in rows:
        r["per_class_min"] = r["n_train"] // r["n_classes"]

    def cpu_minutes(row: dict) -> float:
        return study_minutes[row["dataset"], row["per_class"]]

    fitted = calibrate(rows)
    lodo = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        others = [r for r in rows if r["dataset"] != dataset]
        lodo[dataset] = calibrate(others) if others else DEFAULT_THRESHOLDS
    policies = {
        "always linear": lambda r: ("linear", False),
        "always linear, tap on val": lambda r: (best_linear(r), False),
        "always full": lambda r: ("full", True),
        "2x2 rule": plain_rule,
        "auto (default recipe, CPU)": lambda r: auto_choice(r, RECIPES["default"], cpu_minutes),
        "auto (default recipe, GPU)": lambda r: auto_choice(r, RECIPES["default"], lambda _: 0.0),
        "auto (quick recipe)": lambda r: auto_choice(r, RECIPES["quick"], cpu_minutes),
        "auto (best recipe)": lambda r: auto_choice(r, RECIPES["best"], cpu_minutes),
        "auto (fitted)": lambda r: auto_choice(r, fitted),
        "auto (LODO)": lambda r: auto_choice(r, lodo[r["dataset"]]),
    }
    print(f"{'dataset':12s} {'n/class':>7s} {'gap':>6s} {'conf':>5s} {'FT min':>6s} "
          + " ".join(f"{k:>13s}" for k in rows[0]["accuracy"]) + "   auto (default recipe, CPU)")
    for r in rows:
        chosen, finetuned = auto_choice(r, RECIPES["default"], cpu_minutes)
        print(f"{r['dataset']:12s} {r['per_class_min']:7d} {r['signals']['domain_gap']:6.3f} "
              f"{r['signals']['imagenet_confidence']['mean_max_prob']:5.2f} {cpu_minutes(r):6.1f} "
              + " ".join(f"{v:13.3f}" for v in r["accuracy"].values()) + f"   {chosen}{' (fine-tuned)' * finetuned}")
    for name, thresholds in RECIPES.items():
        print(f"\n{name} recipe: {thresholds!r}", end="")
    print(f"\nfitted:         {fitted!r}")
    for dataset, t in lodo.items():
        print(f"  without {dataset:12s}: {t!r}")
    print(f"\n{'policy':30s} {'mean regret':>11s} {'worst':>7s} {'fine-tunes':>11s}  (accuracy points; {len(rows)} rows)")
    for name, pick in policies.items():
        r, finetunes = regrets(rows, pick)
        print(f"{name:30s} {r.mean():11.2f} {r.max():7.2f} {finetunes:11d}")
    print("\ndefault recipe on this CPU, by auto.finetune_minutes (the study's worst case; FT min above):")
    for budget in BUDGETS:
        thresholds = RECIPES["default"].model_copy(update={"finetune_minutes": float(budget)})
        r, finetunes = regrets(rows, lambda row: auto_choice(row, thresholds, cpu_minutes))
        print(f"  {budget:3d} min: mean {r.mean():.2f}, worst {r.max():.2f}, {finetunes} fine-tunes")


if __name__ == "__main__":
    main()
