"""What ``--strategy auto`` costs on top of a fit: whole ``tlpipe fit`` commands, auto against the
same fit told its strategy, each in a fresh process, as a user runs them.

1. reference: ``tlpipe fit DATA --strategy <what auto picks>`` (and its code tap): the plain
   extraction (no hooks), the Optuna study, the final head, the bundle, MLflow; everything a fit does.
2. auto: ``tlpipe fit DATA`` with the recipe's ``strategy: auto``: the hooked pass (every stage,
   ImageNet logits, BatchNorm moments on train), the signals, the decision, then the same study,
   head, bundle and logging.

Each command gets a fresh output folder and MLflow store (nothing cached between them); Python's
start-up, the data folder's check and the backbone load are in both. The share of the decision is
``(auto - reference) / auto``; issue 4 asks for at most 15% on hymenoptera. Figures are the best of
``--rounds`` rounds (another job on the machine can double any one of them).

Run from the repo root:  python bench/decision_cost.py [--data ../shared/data/hymenoptera] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def timed_fit(data: Path, recipe: str, *flags: str) -> tuple[float, dict]:
    """Seconds of one ``tlpipe fit`` command, and its summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "tlpipe", "fit", str(data), "--recipe", recipe, "--output", str(out),
                   "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--experiment", "decision-cost", *flags]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        return seconds, json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/hymenoptera")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no dataset at {args.data}: pass --data FOLDER (one subfolder per class)")

    best: dict[str, tuple[float, dict]] = {}
    for _ in range(args.rounds):
        auto = timed_fit(args.data, args.recipe)
        picked, layer = auto[1]["strategy"], auto[1]["auto"]["decision"]["layer"]
        plain = timed_fit(args.data, args.recipe, "--strategy", picked, *(["--layer", str(layer)] if picked == "linear" else []))
        for name, result in (("auto", auto), (f"reference ({picked})", plain)):
            if name not in best or result[0] < best[name][0]:
                best[name] = result

    print(f"{args.data.name}, recipe {args.recipe}, best of {args.rounds} rounds\n")
    stages = sorted({k for _, summary in best.values() for k in summary["timings"]})
    print(f"{'':22s} {'total s':>8s} " + " ".join(f"{s:>13s}" for s in stages) + "  val_accuracy")
    for name, (seconds, summary) in best.items():
        t = summary["timings"]
        print(f"{name:22s} {seconds:8.1f} " + " ".join(f"{t.get(s, 0.0):13.1f}" for s in stages)
              + f"  {summary['val_accuracy']:.4f}")
    (auto_s, _), (ref_s, _) = best["auto"], next(v for k, v in best.items() if k != "auto")
    print(f"\nauto / reference: {auto_s / ref_s:.2f}; the decision's share of the auto fit: "
          f"{100 * (auto_s - ref_s) / auto_s:.1f}%")


if __name__ == "__main__":
    main()
