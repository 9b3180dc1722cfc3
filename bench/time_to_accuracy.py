"""Val accuracy against wall time: ``tlpipe fit --time-limit T`` next to two references on the same
data and device, each in a fresh process with a fresh output folder and MLflow store.

Methods, one row each (``bench/results/time_to_accuracy.jsonl``, one JSON line per row; a re-run
skips the rows already there, so a killed benchmark resumes):

- ``tlpipe``: ``tlpipe fit DATA --time-limit T`` (default recipe), T = 2, 5 and 10 min on
  bloodcells and hymenoptera, 10 min on dtd10 and rsscn7 (``--quick``: bloodcells 3 and 10 min,
  hymenoptera with the default budget);
- ``plain``: one plain fine-tune in plain PyTorch + timm, the issue's reference recipe: AdamW,
  backbone LR 5e-4 and head 5e-3, cosine, label smoothing 0.1, RandomResizedCrop 0.5-1 + flip,
  10 epochs at 160 px, same EfficientNet-Lite0 weights; the best epoch's val accuracy;
- ``linear``: ``tlpipe fit DATA --strategy linear`` (the linear probe, its C tuned).

Then prints the table and writes ``bench/results/time_to_accuracy.png`` (accuracy against minutes,
one line per method and dataset). About 90 minutes on a 2-core CPU; see bench/BUDGET.md.

Run from the repo root:  python bench/time_to_accuracy.py [--quick] [--only bloodcells] [--results FILE]
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
DATA = REPO_ROOT.parent / "shared" / "data"
RESULTS = REPO_ROOT / "bench" / "results" / "time_to_accuracy.jsonl"
LIMITS = {"bloodcells": [2, 5, 10], "hymenoptera": [2, 5, 10], "dtd10": [10], "rsscn7": [10]}
QUICK = {"bloodcells": [3, 10], "hymenoptera": [None]}  # None: the default recipe's own budget


def tlpipe_row(dataset: str, minutes: float | None, *flags: str) -> dict:
    """One ``tlpipe fit`` command: wall seconds, val accuracy, what it chose and its plan."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        limit = [] if minutes is None else ["--time-limit", f"{minutes}m"]
        command = [sys.executable, "-m", "tlpipe", "fit", str(DATA / dataset), "--output", str(out),
                   "--tracking-uri", f"sqlite:///{tmp}/mlflow.db", *limit, *flags]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        summary = json.loads((out / "summary.json").read_text())
    return {"seconds": round(seconds, 1), "val_accuracy": summary["val_accuracy"], "strategy": summary["strategy"],
            "fallback_from": (summary.get("auto", {}).get("decision") or {}).get("fallback_from"),
            "plan": summary.get("plan"), "timings": summary["timings"], "tuning": summary.get("tuning")}


def plain_row(dataset: str) -> dict:
    """The reference fine-tune, in a fresh process (``--plain``)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--plain", dataset], check=True, capture_output=True, text=True)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return {**row, "seconds": round(time.perf_counter() - start, 1)}


def plain_finetune(dataset: str | Path, epochs: int = 10, size: int = 160) -> dict:
    """The issue's reference recipe in plain PyTorch + timm (the weights tlpipe uses offline) on a
    dataset of ``../shared/data`` or any folder with train/ and val/."""
    import torch
    from timm.data import create_transform
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from tlpipe.config import load_config
    from tlpipe.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone(load_config()).model
    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # tf_efficientnet_lite's own normalisation
    train_tf = create_transform(size, is_training=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=None, **cfg)
    val_tf = create_transform(size, is_training=False, crop_pct=0.875, **cfg)
    root = DATA / dataset if isinstance(dataset, str) else dataset
    train = ImageFolder(root / "train", train_tf)
    val = ImageFolder(root / "val", val_tf)
    model.reset_classifier(len(train.classes))
    loaders = (DataLoader(train, 32, shuffle=True, num_workers=2, drop_last=True), DataLoader(val, 64, num_workers=2))
    head = list(model.get_classifier().parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": body, "lr": 5e-4}, {"params": head, "lr": 5e-3}], weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loaders[0]))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    best, losses = 0.0, []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for images, labels in loaders[0]:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
        losses.append(total / (len(loaders[0]) * loaders[0].batch_size))
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loaders[1])
        best = max(best, correct / len(val))
    return {"val_accuracy": best, "epochs": epochs, "image_size": size, "first_epoch_loss": losses[0], "train_losses": losses}


def rows_to_run(quick: bool, only: str | None) -> list[tuple[str, str, float | None]]:
    limits = QUICK if quick else LIMITS
    rows = []
    for dataset, minutes in limits.items():
        if only and dataset != only:
            continue
        rows += [(dataset, "tlpipe", m) for m in minutes]
        if not quick:
            rows += [(dataset, "plain", None), (dataset, "linear", None)]
    return rows


def run(quick: bool, only: str | None, results: Path = RESULTS) -> list[dict]:
    results.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    seen = {(r["dataset"], r["method"], r.get("minutes")) for r in done}
    for dataset, method, minutes in rows_to_run(quick, only):
        if (dataset, method, minutes) in seen:
            continue
        if method == "tlpipe":
            row = tlpipe_row(dataset, minutes)
        elif method == "plain":
            row = plain_row(dataset)
        else:
            row = tlpipe_row(dataset, None, "--strategy", "linear")
        row = {"dataset": dataset, "method": method, "minutes": minutes, **row}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.append(row)
        print(f"{dataset:12s} {method:7s} {minutes or '-'!s:>4} min: val {row['val_accuracy']:.3f} in {row['seconds']:.0f} s", flush=True)
    return done


def table(rows: list[dict]) -> str:
    lines = [f"{'dataset':12s} {'method':8s} {'limit':>6s} {'wall':>7s} {'val acc':>8s}  chose"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["method"], r.get("minutes") or 0)):
        limit = f"{r['minutes']}m" if r.get("minutes") else "-"
        chose = r.get("strategy", "") + (f" (from {r['fallback_from']})" if r.get("fallback_from") else "")
        if r.get("plan") and r["plan"].get("train_size"):
            p = r["plan"]
            chose += f"; plan {p['strategy']} {p['train_size']} px, {p['trials']}x{p['epochs']} ep"
        lines.append(f"{r['dataset']:12s} {r['method']:8s} {limit:>6s} {r['seconds'] / 60:6.1f}m {r['val_accuracy']:8.3f}  {chose}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    figure, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method, marker in (("tlpipe", "o-"), ("plain", "s"), ("linear", "^")):
            points = sorted((r["seconds"] / 60, r["val_accuracy"]) for r in rows if r["dataset"] == dataset and r["method"] == method)
            if points:
                ax.plot(*zip(*points), marker, label=method)
        ax.set(title=dataset, xlabel="wall minutes", ylabel="val accuracy")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the acceptance rows only (about 20 min)")
    parser.add_argument("--only", help="one dataset")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON lines to resume (a new file: a new measurement)")
    parser.add_argument("--plain", metavar="DATASET", help=argparse.SUPPRESS)  # the reference, in its own process
    args = parser.parse_args()
    if args.plain:
        print(json.dumps(plain_finetune(args.plain)))
        return
    rows = run(args.quick, args.only, args.results)
    print(table(rows))
    plot(rows, args.results.with_suffix(".png"))


if __name__ == "__main__":
    main()
