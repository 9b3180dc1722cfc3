"""A time limit that holds at any size: when the frozen pass over every image would not fit the
time left, the fit goes on with a stratified sample (every class in it) and says so."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import dataset
from tlpipe import pipeline
from tlpipe.config import load_config
from tlpipe.data import DatasetSpec, Sample
from tlpipe.stages import sample as sample_stage


def test_a_stratified_sample_keeps_every_class_and_the_proportions():
    counts = {"big": 900, "mid": 90, "rare": 3}
    samples = [Sample(f"{name}/{k}.jpg", c) for c, (name, n) in enumerate(counts.items()) for k in range(n)]
    spec = DatasetSpec("root", list(counts), {"train": samples, "val": samples[::10]}, "folder")
    sampled = sample_stage.stratified_sample(spec, 0.05, seed=0)
    train = np.bincount([s.label for s in sampled.splits["train"]], minlength=3)
    assert train.tolist() == [45, 8, 3]  # 5% of each class, at least 8 (or all a class has)
    assert sampled.splits["train"] == sample_stage.stratified_sample(spec, 0.05, seed=0).splits["train"]  # the same images
    assert set(s.label for s in sampled.splits["val"]) == {0, 1, 2}


def test_a_fit_whose_frozen_pass_would_overrun_the_limit_uses_a_sample_says_so_and_extends_it_with_the_time_left(
        tmp_path, monkeypatch):
    root = dataset(tmp_path / "data", ["cats", "dogs", "owls"], split={"train": 40, "val": 10})
    monkeypatch.setattr(sample_stage, "PROBE_FROM", 0)  # this small set stands in for one of 70,000 images:
    monkeypatch.setattr(sample_stage, "SLOWEST_SECONDS_PER_IMAGE", 1e9)  # its pass is timed,
    monkeypatch.setattr(sample_stage, "FROZEN_SHARE", 1e-4)  # and the limit holds a few images of it
    config = load_config("quick", strategy="linear", device="cpu", num_workers=0, budget="2m")
    result = pipeline.fit(root, config, output=tmp_path / "out", tuning=pipeline.TuningOverrides(trials=0))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("stratified sample of 30 (train 24 of 120, val 6 of 30): --time-limit 10m or more would use every image" in note
               for note in summary["data_notes"])  # 8 and 2 a class, the floor
    # the time left after training goes on over the rest of train: all of it here; val stays the sample's
    assert summary["splits"] == {"train": 120, "val": 6} and "probe_speed" in summary["timings"]
    assert any("the frozen pass went on over 96 more train images (train 120 of 120)" in note for note in summary["data_notes"])
    assert sorted(s.path for s in result.spec.splits["train"]) == sorted((root / "train").rglob("*.jpg"))
    assert summary["val_accuracy"] == 1.0  # the added codes line up with their labels


@pytest.mark.parametrize("strategy", ["auto", "linear"])  # the hooked pass; a named strategy's codes
def test_a_fit_whose_frozen_pass_runs_slower_than_measured_stops_it_at_its_share_and_says_so(tmp_path, monkeypatch, strategy):
    from tlpipe.stages import choose as choose_stage
    from tlpipe.stages import extend as extend_stage

    root = dataset(tmp_path / "data", ["cats", "dogs", "owls"], split={"train": 40, "val": 10})
    monkeypatch.setattr(choose_stage, "FROZEN_SHARE", 1e-9)  # the pass's share of the limit is over at its first batch
    monkeypatch.setattr(extend_stage, "MIN_GROWTH", float("inf"))  # the sample as the pass left it (extended: above)
    config = load_config("quick", strategy=strategy, device="cpu", num_workers=0, budget="5m", batch_size=16)
    result = pipeline.fit(root, config, output=tmp_path / "out", tuning=pipeline.TuningOverrides(trials=0))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["splits"] == {"train": 16, "val": 16}  # one batch of each split
    assert result.spec.class_counts("train") == {"cats": 6, "dogs": 5, "owls": 5}  # a stratified sample
    [note] = [note for note in summary["data_notes"] if "stopped there" in note]
    assert "train 16 of 120, val 16 of 30" in note and "the whole pass would take about" in note
    assert note.endswith("--time-limit 25m or more would use every image")  # 5 min x 150 / 32 images, to 5 min up
    with open(tmp_path / "out" / "val_predictions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and all(row["true"] == row["predicted"] for row in rows)  # each code is its own image's
