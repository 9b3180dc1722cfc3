"""What a fit says about the data: wrong labels (label_issues.csv, --exclude-label-issues) and the
learning curve (what more images would buy)."""
from __future__ import annotations

import csv
import json

import numpy as np

from conftest import FAST, class_color, dataset, make_image, tlpipe
from tlpipe.insight.learning_curve import FRACTIONS, learning_curve, nested_subsets

CLASSES = ["rouge", "vert ü", "bleu"]


def _listing(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_a_fit_names_the_train_images_filed_under_the_wrong_class_and_can_train_without_them(tmp_path):
    root = dataset(tmp_path / "colours", CLASSES, split={"train": 30, "val": 5})
    planted = {f"train/{CLASSES[1]}/red-{k}.jpg" for k in range(2)}  # red images filed under green
    for k, name in enumerate(sorted(planted)):
        make_image(root / name, class_color(0), size=(40, 32), noise=20, seed=[99, k])
    before = _listing(root)

    result = tlpipe("fit", root, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    with (tmp_path / "out" / "label_issues.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {row["path"] for row in rows} == planted
    assert {(row["given"], row["suggested"]) for row in rows} == {(CLASSES[1], CLASSES[0])}
    assert all(0 <= float(row["quality"]) < 0.5 for row in rows)
    assert "2 of 92 train images look mislabelled" in " ".join(result.output.split())
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert page.count(f"given <b>{CLASSES[1]}</b>, looks like <b>{CLASSES[0]}</b>") == 2 and page.count('<img alt="train/') == 2

    result = tlpipe("fit", root, "-o", tmp_path / "clean", "--exclude-label-issues", *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "clean" / "summary.json").read_text())
    assert summary["splits"]["train"] == 90 and summary["label_issues"]["excluded"]["images"] == 2
    assert summary["val_accuracy"] == 1.0
    assert _listing(root) == before  # the dataset is never touched


def test_the_learning_curve_is_nested_and_says_what_twice_the_images_would_give():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 32))
    draw = lambda n: (lambda y: (centres[y] * 0.35 + rng.normal(size=(n, 32)), y))(rng.integers(0, 4, n))  # noqa: E731
    (X, y), (X_val, y_val) = draw(240), draw(400)

    subsets = nested_subsets(y, FRACTIONS, seed=0)
    assert all(set(small) <= set(large) for small, large in zip(subsets, subsets[1:]))
    assert all(len(np.unique(y[rows])) == 4 for rows in subsets) and len(subsets[-1]) == len(y)

    curve = learning_curve(X, y, X_val, y_val, "logreg", 1.0)
    assert curve.sizes == sorted(curve.sizes) and curve.sizes[-1] == 240
    assert curve.accuracy[-1] > curve.accuracy[0]  # this data rewards more images
    double, quadruple = curve.predicted["2x"], curve.predicted["4x"]
    assert double["images"] == 480 and double["low"] <= double["accuracy"] <= double["high"]
    assert curve.accuracy[-1] <= double["accuracy"] <= quadruple["accuracy"] <= 1
    assert "(240 -> 480)" in curve.sentence()
    assert learning_curve(X[:20], y[:20], X_val, y_val, "logreg", 1.0) is None  # too few for a curve
