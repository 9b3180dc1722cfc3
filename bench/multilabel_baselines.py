"""Plain multi-label baselines on a set from ``bench/make_multilabel.py``: what tlpipe's multi-label fit must beat.

- ``logreg``: one-vs-rest logistic regression (scikit-learn, C fixed at ``--C`` 1.0 on standardized
  features, no search) on the backbone's pooled penultimate codes, taken through tlpipe's own
  extractor and eval preprocessing (resize + centre crop as the pretrained config says);
- ``finetune`` (with ``--finetune``): a plain BCE fine-tune of the same backbone with a new
  10-way head: AdamW, lr 1e-3 head / 1e-4 backbone, constant, batch 32, ``--epochs`` 10, images
  resized to 224 px (no crop, so no label is cut out), random horizontal flips, the pretrained
  config's mean and std; scored after the last epoch.

Every label is predicted at a 0.5 threshold. Prints one row per baseline on the val split: mAP
(scikit-learn's average precision, macro over the labels that have a positive in val), micro-F1,
macro-F1, subset accuracy (all labels right), Hamming loss and the baseline's wall seconds (codes
or training included).

Run from the repo root:  python bench/multilabel_baselines.py /tmp/ml [--backbone efficientnet_lite0] [--finetune]
(logreg on 300 + 100 images: about 30 s on 2 CPU cores; the fine-tune is meant for a GPU.)
"""
from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torchvision import transforms

from tlpipe.data import Sample, eval_loader
from tlpipe.device import resolve_device
from tlpipe.models import CodeExtractor, create_backbone, extract_codes


def read_set(root: Path) -> tuple[list[str], dict[str, tuple[list[Path], np.ndarray]]]:
    """The classes and, per split, the image paths and their (N, K) 0/1 label matrix."""
    rows = list(csv.DictReader(open(root / "labels.csv")))
    classes = sorted({c for r in rows for c in r["labels"].split(";")})
    splits = {}
    for split in ("train", "val"):
        mine = [r for r in rows if r["split"] == split]
        y = np.array([[c in r["labels"].split(";") for c in classes] for r in mine], dtype=np.int64)
        splits[split] = ([root / r["path"] for r in mine], y)
    return classes, splits


def scores(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    pred = (prob >= 0.5).astype(np.int64)
    has_pos = y.sum(0) > 0  # AP is undefined for a label with no positive in val
    return {"mAP": average_precision_score(y[:, has_pos], prob[:, has_pos], average="macro"),
            "micro-F1": f1_score(y, pred, average="micro", zero_division=0),
            "macro-F1": f1_score(y, pred, average="macro", zero_division=0),
            "subset-acc": accuracy_score(y, pred), "hamming": hamming_loss(y, pred)}


def codes(backbone, paths: list[Path], device: torch.device) -> np.ndarray:
    """Penultimate codes through tlpipe's extractor; a sample's label is only its row number."""
    loader = eval_loader([Sample(p, i) for i, p in enumerate(paths)], backbone.data_config, batch_size=64)
    with CodeExtractor(backbone.model) as extractor:
        features, order = extract_codes(extractor, loader, device, "Codes")
    assert (order == np.arange(len(paths))).all()
    return features


def logreg(backbone, splits, device, c: float) -> np.ndarray:
    (train_paths, y_train), (val_paths, _) = splits["train"], splits["val"]
    x_train, x_val = codes(backbone, train_paths, device), codes(backbone, val_paths, device)
    model = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=c, max_iter=5000)))
    return model.fit(x_train, y_train).predict_proba(x_val)


class Images(torch.utils.data.Dataset):
    def __init__(self, paths, y, transform):
        self.paths, self.y, self.transform = paths, torch.tensor(y, dtype=torch.float32), transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(Image.open(self.paths[i]).convert("RGB")), self.y[i]


def finetune(backbone, splits, device, epochs: int, n_classes: int) -> np.ndarray:
    model = copy.deepcopy(backbone.model)  # the pretrained backbone stays as it was
    model.reset_classifier(n_classes)
    model.to(device)
    norm = transforms.Normalize(backbone.data_config["mean"], backbone.data_config["std"])
    resize = transforms.Resize((224, 224))
    train_tf = transforms.Compose([resize, transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    val_tf = transforms.Compose([resize, transforms.ToTensor(), norm])
    train = torch.utils.data.DataLoader(Images(*splits["train"], train_tf), batch_size=32, shuffle=True, num_workers=2, drop_last=True)
    val = torch.utils.data.DataLoader(Images(*splits["val"], val_tf), batch_size=64, num_workers=2)
    head = set(model.get_classifier().parameters())
    optimizer = torch.optim.AdamW([{"params": list(head), "lr": 1e-3},
                                   {"params": [p for p in model.parameters() if p not in head], "lr": 1e-4}])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        model.train()
        total, seen, start = 0.0, 0, time.perf_counter()
        for images, targets in train:
            images, targets = images.to(device), targets.to(device)
            loss = loss_fn(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(images), seen + len(images)
        print(f"  epoch {epoch + 1}/{epochs}: train BCE {total / max(seen, 1):.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    with torch.inference_mode():
        return torch.cat([torch.sigmoid(model(images.to(device))).float().cpu() for images, _ in val]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a folder written by bench/make_multilabel.py")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--C", type=float, default=1.0, help="logreg inverse regularization (fixed)")
    parser.add_argument("--finetune", action="store_true", help="also run the BCE fine-tune")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    classes, splits = read_set(args.data)
    device = resolve_device(args.device)
    backbone = create_backbone(args.backbone)
    y_val = splits["val"][1]
    print(f"{args.data}: {len(splits['train'][0])} train / {len(y_val)} val images, {len(classes)} labels, "
          f"{y_val.sum(1).mean():.2f} labels per val image; {args.backbone} ({backbone.weights.kind}) on {device}")

    rows = []
    runs = [("logreg", lambda: logreg(backbone, splits, device, args.C))]
    if args.finetune:
        runs.append(("finetune", lambda: finetune(backbone, splits, device, args.epochs, len(classes))))
    for name, run in runs:
        start = time.perf_counter()
        prob = run()
        rows.append((name, scores(y_val, prob), time.perf_counter() - start))

    metrics = list(rows[0][1])
    print(f"\n{'baseline':10s}" + "".join(f"{m:>12s}" for m in metrics) + f"{'seconds':>10s}")
    for name, values, seconds in rows:
        print(f"{name:10s}" + "".join(f"{values[m]:12.4f}" for m in metrics) + f"{seconds:10.1f}")


if __name__ == "__main__":
    main()
