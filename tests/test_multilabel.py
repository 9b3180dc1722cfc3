"""Multi-label classification end to end: a table whose label cells hold sets (``red;blue``) is fitted
by one-vs-rest logistic regression scored by mean average precision, with a temperature and a
threshold per class, and every command answers with label sets (predict, evaluate, ONNX export,
the MLflow model served by ``mlflow models serve``); a fine-tune trains with binary cross-entropy."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score

from conftest import FAST, class_color, mlflow_serve_answer, one_line, tlpipe
from tlpipe.bundle.calibration import DEFAULT_THRESHOLD, decision_thresholds
from tlpipe.bundle.metrics import multilabel_metrics
from tlpipe.data import prepare_dataset
from tlpipe.data.table import LabelTable
from tlpipe.training.multilabel import MultilabelProbe

COLOURS = ("red", "green", "blue", "yellow")


def _halves(path: Path, left: int, right: int, seed: int) -> Path:
    """A 64x64 picture: colour ``left`` on its left half, ``right`` on its right, with noise."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((64, 64, 3))
    pixels[:, :32], pixels[:, 32:] = class_color(left), class_color(right)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels + rng.integers(-20, 21, pixels.shape), 0, 255).astype(np.uint8)).save(path)
    return path


def _table(root: Path, per_split=(("train", 40), ("val", 16)), split_column: bool = True) -> Path:
    """``root/labels.csv``: images of one or two colours, the colours they show as their labels."""
    rows, rng = [], np.random.default_rng(0)
    for split, n in per_split:
        for k in range(n):
            left, right = (int(c) for c in rng.integers(0, len(COLOURS), 2))
            name = f"images/{split}_{k}.png"
            _halves(root / name, left, right, seed=[len(rows)])
            rows.append({"path": name, "labels": ";".join(sorted({COLOURS[left], COLOURS[right]})), "split": split})
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels", "split"][:3 if split_column else 2], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def test_label_sets_in_a_table_make_a_multilabel_spec_whose_held_out_val_keeps_every_label(tmp_path):
    spec = prepare_dataset(_table(tmp_path, (("train", 60),), split_column=False), val_fraction=0.25)
    assert spec.multilabel and spec.classes == sorted(COLOURS) and sum(spec.counts().values()) == 60
    assert 12 <= spec.counts()["val"] <= 18  # iterative stratification holds out about the share asked
    for split in ("train", "val"):
        labels = spec.labels(split)
        assert labels.shape == (spec.counts()[split], 4) and set(np.unique(labels)) == {0, 1}
        assert all(count > 0 for count in spec.class_counts(split).values())  # iterative stratification
    rows = {r["path"]: set(r["labels"].split(";")) for r in csv.DictReader((tmp_path / "labels.csv").open())}
    for sample in spec.splits["val"]:
        assert {c for c, on in zip(spec.classes, sample.label) if on} == rows[spec.relative(sample.path)]


def test_the_probe_ranks_by_mean_average_precision_and_a_class_present_everywhere_is_a_constant():
    rng = np.random.default_rng(0)
    Y = rng.integers(0, 2, (160, 3))
    Y[:, 2] = 1  # every image has it: no logistic regression to fit
    X = Y[:, :2] @ rng.normal(size=(2, 16)) + 0.5 * rng.normal(size=(160, 16))
    probe = MultilabelProbe(cv_folds=3).fit(X[:120], Y[:120], X[120:], Y[120:])
    head = probe.head_
    assert head.multilabel and probe.val_score_ > 0.95 and probe.C_ in probe.c_grid
    probabilities = head.predict_proba(X[120:])
    assert probabilities.shape == (40, 3) and np.all(probabilities[:, 2] > 0.99)
    expected = np.mean([average_precision_score(Y[120:, j], probabilities[:, j]) for j in range(3)])
    assert probe.val_score_ == pytest.approx(expected)


def test_thresholds_maximise_each_class_f1_and_stay_at_the_default_with_few_positives():
    Y = np.array([[1, 0], [1, 0], [1, 1], [1, 0], [1, 0], [0, 0], [0, 0], [0, 0]])
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.9], [0.35, 0.3], [0.3, 0.2], [0.2, 0.1], [0.1, 0.6], [0.05, 0.2]])
    thresholds = decision_thresholds(scores, Y)
    assert 0.2 < thresholds[0] <= 0.3 and thresholds[1] == DEFAULT_THRESHOLD  # class 1: one positive
    metrics = multilabel_metrics(Y, scores, thresholds, ["a", "b"])
    assert metrics["per_class"]["a"]["f1"] == 1.0 and metrics["per_class"]["a"]["average_precision"] == 1.0
    assert metrics["subset_accuracy"] == 7 / 8 and metrics["hamming_loss"] == 1 / 16
    low, high = metrics["mean_average_precision_ci"]
    assert low <= metrics["mean_average_precision"] <= high


def test_a_multilabel_fit_predicts_evaluates_exports_and_serves_label_sets(tmp_path):
    table, out = _table(tmp_path / "data"), tmp_path / "out"
    result = tlpipe("fit", table, "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "multilabel" and summary["val_map"] > 0.9, summary["metrics"]
    manifest = json.loads((out / "model" / "bundle.json").read_text())
    assert manifest["head"]["task"] == "multilabel" and set(manifest["head"]["thresholds"]) == set(COLOURS)
    val = [r for r in csv.DictReader(table.open()) if r["split"] == "val"]
    images = [tmp_path / "data" / r["path"] for r in val[:4]]
    predicted = json.loads(tlpipe("predict", out / "model", *images, "-f", "json", "--workers", "0").stdout)
    sets = [{p["label"] for p in row["predictions"]} for row in predicted]
    assert sum(s == set(r["labels"].split(";")) for s, r in zip(sets, val)) >= 3  # label sets, not a top-1
    scored = tlpipe("evaluate", out / "model", table, "--split", "val", "--json", "--workers", "0")
    assert json.loads(scored.stdout)["mean_average_precision"] == pytest.approx(summary["val_map"])
    exported = tlpipe("export", out / "model")
    assert exported.exit_code == 0, exported.output
    record = json.loads((out / "export" / "model.onnx.json").read_text())
    assert record["task"] == "multilabel" and len(record["thresholds"]) == 4 and record["parity"]["passed"]
    assert all(row["top1_agreement"] == 1.0 and row["max_abs_difference"] <= 1e-4 for row in record["parity"]["batches"].values())
    served = mlflow_serve_answer(summary, images, tmp_path / "serve.log")
    assert [set(row["labels"]) for row in served] == sets

    pool = [_halves(tmp_path / "pool" / f"{k}.png", k % 4, (k + 1) % 4, seed=[99, k]) for k in range(4)]
    suggested = tlpipe("suggest", out / "model", tmp_path / "pool", "-n", "4", "-o", tmp_path / "picks", "--workers", "0")
    assert suggested.exit_code == 0, suggested.output
    answers = json.loads(tlpipe("predict", out / "model", *pool, "-f", "json", "--workers", "0").stdout)
    predicted = {Path(row["path"]).name: {p["label"] for p in row["predictions"]} for row in answers}
    guesses = {Path(r["path"]).name: set(filter(None, r["model_guess"].split(";")))
               for r in csv.DictReader((tmp_path / "picks" / "suggestions.csv").open(encoding="utf-8"))}
    assert guesses and all(predicted[name] == guess for name, guess in guesses.items())  # the label sets predict answers
    assert any(len(guess) == 2 for guess in guesses.values())  # (others near-copies of train, skipped)
    tasks = json.loads((tmp_path / "picks" / "label_studio.json").read_text(encoding="utf-8"))
    assert [set(t["predictions"][0]["result"][0]["value"]["choices"]) for t in tasks] == list(guesses.values())


def test_a_partial_fine_tune_of_a_multilabel_table_trains_with_binary_cross_entropy(tmp_path):
    out = tmp_path / "out"
    result = tlpipe("fit", _table(tmp_path), "-o", out, "--strategy", "partial", "--unfreeze-stages", "1", "--epochs", "2",
                    "--image-size", "64", "--trials", "0", "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    head = summary["head"]
    assert summary["task"] == "multilabel" and summary["strategy"] == "partial" and head["epochs_run"] >= 2, head
    assert summary["val_map"] > 0.8 and len(head["calibration"]["thresholds"]) == 4
    bundle_head = json.loads((out / "model" / "bundle.json").read_text())["head"]
    assert (bundle_head["kind"], bundle_head["task"]) == ("finetune", "multilabel")


def test_task_option_makes_one_label_rows_multilabel_and_multiclass_keeps_a_cell_whole(tmp_path):
    table = _table(tmp_path, (("train", 16), ("val", 8)))
    rows = list(csv.DictReader(table.open()))
    single = tmp_path / "single.csv"
    with single.open("w", newline="") as f:
        csv.writer(f).writerows([["path", "labels", "split"], *([r["path"], r["labels"].split(";")[0], r["split"]] for r in rows)])
    assert not prepare_dataset(single).multilabel and prepare_dataset(LabelTable(single, task="multilabel")).multilabel
    whole = prepare_dataset(LabelTable(table, task="multiclass"), hold_out=False, evaluation=True)
    assert not whole.multilabel and any(";" in name for name in whole.classes)
    one_line(tlpipe("inspect", tmp_path / "no-such-folder", "--task", "multilabel"), "--task is for a table")


def test_inspect_and_extract_of_a_multilabel_table(tmp_path):
    table = _table(tmp_path, (("train", 20), ("val", 4)))
    inspected = tlpipe("inspect", table, "--workers", "0", "--json", tmp_path / "inspect.json")
    assert inspected.exit_code == 0, inspected.output
    result = json.loads((tmp_path / "inspect.json").read_text())  # the transfer signals scored by mAP, one-vs-rest
    assert result["signals"]["score"] == "mAP" and result["signals"]["penultimate"]["probe_accuracy"] > 0.8
    assert "scores mAP" in result["decision"]["explanation"]
    assert tlpipe("extract", table, "-o", tmp_path / "codes.npz", "--workers", "0").exit_code == 0
    codes = np.load(tmp_path / "codes.npz")
    rows = {r["path"]: set(r["labels"].split(";")) for r in csv.DictReader(table.open())}
    assert codes["labels"].shape == (24, 4)
    for path, row in zip(codes["paths"], codes["labels"]):
        assert {c for c, on in zip(codes["classes"], row) if on} == rows[path]


def test_a_test_time_option_on_a_multilabel_set_is_judged_by_its_map_gain_against_a_paired_standard_error():
    from tlpipe.stages.check import paired_gain
    from tlpipe.training.multilabel import fit_multilabel_head

    rng = np.random.default_rng(0)
    Y = rng.integers(0, 2, (80, 4))
    clean = Y * 2.0 - 1 + rng.normal(0, 0.5, Y.shape)  # codes that say the labels
    noisy = clean + rng.normal(0, 1.5, Y.shape)  # the plain pass, worse than the option
    head = fit_multilabel_head(1.0, clean, Y)
    score, gain, se = paired_gain(head, noisy, clean, Y)
    assert score == pytest.approx(average_precision_score(Y, head.logits(clean), average="macro"))
    assert gain == pytest.approx(score - average_precision_score(Y, head.logits(noisy), average="macro"))
    assert gain > se > 0  # kept: the gain is beyond its standard error
    assert paired_gain(head, clean, clean, Y)[1:] == (0.0, 0.0)  # the same codes: nothing gained, no doubt
