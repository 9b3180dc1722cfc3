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

``--all`` instead runs one auto fit on each dataset of ../shared/data and on the digits example
(``--example digits``, as the README runs it) and prints, per dataset, the ``decide`` stage's
seconds (summary.json's timings), the fit's wall seconds and the decision's share of them (issue
12 asks for at most 15%). ``--output DIR`` keeps each fit's folder (and its caches) under DIR;
``--datasets`` names a subset (``digits`` is the example), ``--time-limit`` is passed to each fit.

Run from the repo root:  python bench/decision_cost.py [--data ../shared/data/hymenoptera] [--rounds 2]
                         python bench/decision_cost.py --all [--recipe quick] [--output /tmp/decide]
                                [--datasets dtd10,digits] [--time-limit 10m]
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
SHARED_DATA = REPO_ROOT.parent / "shared/data"
DATASETS = ("hymenoptera", "bloodcells", "dtd10", "rsscn7")


def timed_fit(data: Path | None, recipe: str, *flags: str, keep: Path | None = None) -> tuple[float, dict]:
    """Seconds of one ``tlpipe fit`` command (on ``data``, or on what ``flags`` name, such as
    ``--example digits``), and its summary.json; ``keep``: the output folder to leave behind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = keep or Path(tmp) / "out"
        command = [sys.executable, "-m", "tlpipe", "fit", *([str(data)] if data else []), "--recipe", recipe,
                   "--output", str(out), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--experiment", "decision-cost",
                   *flags]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        return seconds, json.loads((out / "summary.json").read_text())


def decision_shares(recipe: str, output: Path | None, names: list[str], time_limit: str | None) -> None:
    """One auto fit per dataset of ``SHARED_DATA`` and on the digits example: decide s, wall s, share."""
    limit = ("--time-limit", time_limit) if time_limit else ()
    runs = [(name, SHARED_DATA / name, limit) for name in DATASETS if name in names and (SHARED_DATA / name).is_dir()]
    if "digits" in names:
        runs.append(("digits", None, ("--example", "digits", *limit)))
    print(f"recipe {recipe}\n\n{'dataset':12s} {'decide s':>9s} {'fit s':>8s} {'share':>7s}  strategy / tap, val_accuracy")
    for name, data, flags in runs:
        keep = output / name if output else None
        if keep and keep.exists():
            raise SystemExit(f"{keep} exists: pass another --output, or remove it for a cold run")
        seconds, summary = timed_fit(data, recipe, *flags, keep=keep)
        decide = summary["timings"].get("decide", 0.0)
        print(f"{name:12s} {decide:9.1f} {seconds:8.1f} {100 * decide / seconds:6.1f}%  "
              f"{summary['strategy']} / {summary['layer']}, {summary['val_accuracy']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/hymenoptera")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--all", action="store_true", help="the decision's share on every shared dataset and digits")
    parser.add_argument("--output", type=Path, help="with --all: keep each fit's folder under this one")
    parser.add_argument("--datasets", default=",".join((*DATASETS, "digits")), help="with --all: which, comma-separated")
    parser.add_argument("--time-limit", help="with --all: each fit's --time-limit (default: the recipe's budget)")
    args = parser.parse_args()
    if args.all:
        return decision_shares(args.recipe, args.output, args.datasets.split(","), args.time_limit)
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
