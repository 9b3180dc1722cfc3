"""Acceptance on the real datasets in ../shared/data (skipped when that folder is absent)."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import shared_dataset, tree_snapshot
from tlpipe.cli import app
from typer.testing import CliRunner

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def hymenoptera_fit(tmp_path_factory):
    data = shared_dataset("hymenoptera")
    out = tmp_path_factory.mktemp("hymenoptera") / "out"
    result = runner.invoke(app, ["fit", str(data), "--output", str(out)])  # --strategy auto, the default
    assert result.exit_code == 0, result.output
    return data, out


def test_auto_picks_a_linear_probe_on_hymenoptera_and_reaches_the_reference_accuracy(hymenoptera_fit, mlflow_store):
    from mlflow.tracking import MlflowClient

    _, out = hymenoptera_fit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "linear"  # small data near ImageNet
    assert summary["auto"]["decision"]["size"] == "small" and summary["auto"]["decision"]["similarity"] == "near"
    assert summary["val_accuracy"] >= 0.94
    assert summary["splits"] == {"train": 245, "val": 153}
    run = MlflowClient(mlflow_store).get_run(summary["run_id"])
    assert run.data.metrics["val_accuracy"] == pytest.approx(summary["val_accuracy"])


def test_predict_on_the_val_images_reproduces_the_fit_accuracy(hymenoptera_fit):
    data, out = hymenoptera_fit
    summary = json.loads((out / "summary.json").read_text())
    result = runner.invoke(app, ["predict", str(out / "model"), str(data / "val"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 153
    accuracy = np.mean([row["label"] == row["path"].split("/")[-2] for row in rows])
    assert accuracy == summary["val_accuracy"]


def test_dirty_copy_quarantines_exactly_the_three_bad_files(tmp_path):
    data = tmp_path / "hymenoptera"
    shutil.copytree(shared_dataset("hymenoptera"), data)
    ants = data / "train" / "ants"
    photo = sorted(ants.glob("*.jpg"))[0]
    (ants / "truncated.jpg").write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
    (ants / "empty.jpg").write_bytes(b"")
    (ants / "x.png").write_text("this is text, not a PNG")
    Image.open(photo).convert("CMYK").save(ants / "cmyk.jpg")
    grey16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(grey16).save(ants / "grey16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.open(photo).save(data / "train" / "bees" / "rotated.jpg", exif=exif)
    before = tree_snapshot(data)

    out = tmp_path / "out"
    result = runner.invoke(app, ["fit", str(data), "--recipe", "quick", "--output", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "quarantine.csv") as f:
        quarantined = {row["path"] for row in csv.DictReader(f)}
    assert quarantined == {"train/ants/truncated.jpg", "train/ants/empty.jpg", "train/ants/x.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"] == 245 + 3  # cmyk, 16-bit and rotated images were kept
    assert tree_snapshot(data) == before


def test_inspect_names_the_strategy_and_tap_that_fit_uses_on_rsscn7(tmp_path):
    """rsscn7 (aerial scenes, far from ImageNet) is where an earlier stage's codes win: ``inspect``
    runs the fit's policy steps (decide, then the tap on validation), so it names what the fit
    saves. The quick recipe is cost first (linear below 150 images a class on any device), so the
    test's cost does not depend on the machine's speed."""
    data = shared_dataset("rsscn7")
    report_path, out = tmp_path / "inspect.json", tmp_path / "out"
    inspected = runner.invoke(app, ["inspect", str(data), "--recipe", "quick", "--json", str(report_path)])
    assert inspected.exit_code == 0, inspected.output
    fitted = runner.invoke(app, ["fit", str(data), "--recipe", "quick", "--trials", "0", "--output", str(out)])
    assert fitted.exit_code == 0, fitted.output
    report, summary = json.loads(report_path.read_text()), json.loads((out / "summary.json").read_text())
    assert (report["strategy"], report["layer"]) == (summary["strategy"], summary["layer"])
    assert summary["layer"] != "penultimate"  # an earlier stage does better on validation here
    assert json.loads((out / "model" / "bundle.json").read_text())["codes"]["layer"] == summary["layer"]
