"""The far-data regression bench: does a 10-minute fit's fine-tune learn, and does it use its time?

Per dataset (``../shared/data``'s four, and scikit-learn's digits in both ink polarities, written by
this script outside the repo as train/ and val/ folders with tlpipe's own 20 % stratified hold-out,
so that ``tlpipe fit --example digits`` sees the same split), one row per method, each in a fresh
process with a fresh output folder and MLflow store:

- ``plain``: the reference fine-tune of ``bench/time_to_accuracy.py`` (AdamW, backbone 5e-4, head
  5e-3, cosine, label smoothing, 10 epochs at 160 px), with its first-epoch train loss;
- ``linear``: ``tlpipe fit DATA --strategy linear`` (the linear probe, C tuned);
- ``tlpipe``: ``tlpipe fit DATA --time-limit 10m`` (default recipe), with the fine-tune's
  first-epoch loss against chance (ln K), its restarts, the augmentation it kept, the epochs
  planned and run, the planned and measured seconds per epoch, and the share of the limit used.

Rows go to ``bench/results/far_finetune.jsonl`` as they finish (``--results FILE`` for another); a
re-run skips the rows there, so a killed bench resumes. About 100 minutes on 2 CPU cores; never
run it beside another benchmark (every timing doubles).

Run from the repo root:  python bench/far_finetune.py [--only digits-white] [--methods tlpipe]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared" / "data"
RESULTS = REPO_ROOT / "bench" / "results" / "far_finetune.jsonl"
DIGITS = ("digits-white", "digits-black")  # white ink on black (far), dark ink on white (the --example)
DATASETS = [*DIGITS, "bloodcells", "dtd10", "rsscn7", "hymenoptera"]
METHODS = ("tlpipe", "plain", "linear")
LIMIT_MINUTES = 10


def write_digits(root: Path, white_ink: bool) -> Path:
    """scikit-learn's 8x8 digits at 32 px as ``--example digits`` writes them (inverted: white ink),
    split into train/ and val/ as tlpipe holds out 20 % (stratified, seed 0)."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if (root / ".complete").exists():
        return root
    digits = load_digits()
    rows = np.arange(len(digits.target))
    train, _ = train_test_split(rows, test_size=0.2, stratify=digits.target, random_state=0)
    train = set(train.tolist())
    for index, (image, target) in enumerate(zip(digits.images, digits.target)):
        pixels = image * (255 / 16) if white_ink else 255 - image * (255 / 16)
        path = root / ("train" if index in train else "val") / f"digit_{target}" / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8), "L").resize((32, 32), Image.NEAREST).save(path)
    (root / ".complete").touch()
    return root


def dataset_folder(name: str, scratch: Path) -> Path:
    if name in DIGITS:
        return write_digits(scratch / name, white_ink=name == "digits-white")
    return SHARED / name


def tlpipe_row(data: Path, *flags: str) -> dict:
    """One ``tlpipe fit`` in a fresh process: wall time, accuracy, and what its fine-tune did."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        command = [sys.executable, "-m", "tlpipe", "fit", str(data), "--output", str(out),
                   "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", *flags]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
        trials = _trial_rows(out)
    head, plan = summary["head"], summary.get("plan") or {}
    return {
        "seconds": round(wall, 1), "val_accuracy": summary["val_accuracy"], "strategy": summary["strategy"],
        "strategy_reason": summary["strategy_reason"], "chance_loss": math.log(len(summary["classes"])),
        "plan": {k: plan.get(k) for k in ("strategy", "train_size", "epochs", "trials", "seconds", "notes", "augment_check")},
        "trials": trials, "budget": summary.get("budget"), "timings": summary["timings"],
        "finetune": {k: head.get(k) for k in ("first_batch_loss", "first_epoch_loss", "start_loss", "restarts", "epochs_run",
                                              "epochs_fitted", "best_epoch", "cut_by_deadline", "image_size")},
    }


def _trial_rows(out: Path) -> list[dict]:
    """Each fine-tuning trial's epochs: train loss, val accuracy and seconds (from its checkpoint)."""
    import torch

    rows = []
    for trial in sorted((out / "trials").glob("*")) if (out / "trials").exists() else []:
        for checkpoint in sorted(trial.rglob("checkpoint.pt")):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state"]
            rows.append({"trial": trial.name, "attempt": checkpoint.parent.name, "epochs_fitted": state.get("epochs"),
                         "epochs": [{k: round(e[k], 4) for k in ("train_loss", "val_accuracy", "epoch_seconds")}
                                    for e in state["history"]]})
    return rows


def plain_row(data: Path) -> dict:
    """The reference fine-tune (``bench/time_to_accuracy.py --plain``) in a fresh process."""
    script = REPO_ROOT / "bench" / "time_to_accuracy.py"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(script), "--plain", str(data)], check=True, capture_output=True, text=True)
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": round(time.perf_counter() - start, 1)}


def run(datasets: list[str], methods: list[str], results: Path, scratch: Path) -> list[dict]:
    results.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    seen = {(r["dataset"], r["method"]) for r in done}
    for dataset in datasets:
        for method in methods:
            if (dataset, method) in seen:
                continue
            data = dataset_folder(dataset, scratch)
            if method == "tlpipe":
                row = tlpipe_row(data, "--time-limit", f"{LIMIT_MINUTES}m")
            elif method == "linear":
                row = tlpipe_row(data, "--strategy", "linear")
            else:
                row = plain_row(data)
            row = {"dataset": dataset, "method": method, **row}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
            print(f"{dataset:13s} {method:7s} val {row['val_accuracy']:.3f} in {row['seconds']:.0f} s", flush=True)
    return done


def table(rows: list[dict]) -> str:
    lines = [f"{'dataset':13s} {'method':7s} {'wall':>6s} {'used':>5s} {'val acc':>7s} {'ep1 loss':>8s} {'ln K':>5s} "
             f"{'epochs plan/run':>15s} {'s/epoch plan/run':>16s}  chose"]
    for r in sorted(rows, key=lambda r: (DATASETS.index(r["dataset"]) if r["dataset"] in DATASETS else 99, r["method"])):
        ft, plan = r.get("finetune") or {}, r.get("plan") or {}
        epochs = [e for t in r.get("trials", []) for e in t["epochs"]]
        measured = np.median([e["epoch_seconds"] for e in epochs]) if epochs else None
        planned = (plan.get("seconds") or {}).get("epoch")
        used = f"{r['seconds'] / 60 / LIMIT_MINUTES:.0%}" if r["method"] == "tlpipe" else "-"
        loss = ft.get("first_epoch_loss") if r["method"] == "tlpipe" else r.get("first_epoch_loss")
        runs = "/".join(str(len(t["epochs"])) for t in r.get("trials", [])) or "-"
        lines.append(
            f"{r['dataset']:13s} {r['method']:7s} {r['seconds'] / 60:5.1f}m {used:>5s} {r['val_accuracy']:7.3f} "
            f"{'-' if loss is None else f'{loss:.3f}':>8s} {r.get('chance_loss', 0):5.2f} "
            f"{str(plan.get('trials', '-')) + 'x' + str(plan.get('epochs', '-')) + ' / ' + runs:>15s} "
            f"{'-' if planned is None else f'{planned:.0f}':>7s} / {'-' if measured is None else f'{measured:.0f}':<6s}  "
            f"{r.get('strategy', '')}{' ' + str(plan.get('train_size')) + ' px' if plan.get('train_size') else ''}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=DATASETS, help="these datasets")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON lines to resume (a new file: a new measurement)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "tlpipe-far-bench",
                        help="where the digits datasets are written (never inside the repo)")
    args = parser.parse_args()
    rows = run(args.only or DATASETS, args.methods, args.results, args.scratch)
    print(table(rows))


if __name__ == "__main__":
    main()
