"""Honest scores: a fit with a test/ split scores it once, at the end, and leads with that figure;
``evaluate`` says when the images it scores are ones the fit trained on or chose its settings
with, matched by content (a renamed copy counts), and stays quiet on images the fit never saw."""
import json
import shutil

import pytest

from conftest import FAST, dataset, tlpipe


@pytest.fixture(scope="module")
def fit_with_test(tmp_path_factory):
    root = dataset(tmp_path_factory.mktemp("data") / "pets", ["cats", "dogs"], split={"train": 6, "val": 4, "test": 3})
    out = tmp_path_factory.mktemp("fit") / "out"
    result = tlpipe("fit", root, "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    return root, out, result.stdout


def test_a_fit_scores_its_test_split_once_and_leads_with_it(fit_with_test):
    root, out, printed = fit_with_test
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"]["n_images"] == 6 and summary["test"]["seen_by_fit"] == {"train": 0, "val": 0}
    assert summary["score"]["split"] == "test" and summary["score"]["value"] == summary["test"]["accuracy"]
    assert "Score  test accuracy" in printed
    page = (out / "report.html").read_text()
    assert f"test accuracy <b>{summary['test']['accuracy']:.3f}</b>" in page


def test_a_fit_without_test_says_its_val_figure_chose_the_settings(bundle_dir):
    summary = json.loads((bundle_dir[1].parent / "summary.json").read_text())
    assert "test" not in summary and summary["score"]["split"] == "val"
    assert "flatters" in summary["score"]["note"]


@pytest.mark.parametrize("split, seen", [("val", {"train": 0, "val": 8}), ("train", {"train": 12, "val": 0}),
                                         ("test", {"train": 0, "val": 0})])
def test_evaluate_warns_on_images_the_fit_saw_and_not_on_test(fit_with_test, split, seen):
    root, out, _ = fit_with_test
    result = tlpipe("evaluate", out / "model", root, "--split", split, "--json")
    assert result.exit_code == 0, result.output
    scored = json.loads(result.stdout)
    assert scored["split"] == split and scored["seen_by_fit"] == seen
    assert bool(scored["warnings"]) == (split != "test") == ("warning:" in result.stderr)


def test_evaluate_knows_a_renamed_copy_of_a_val_image(fit_with_test, tmp_path):
    root, out, _ = fit_with_test
    for name in ("cats", "dogs"):  # a "new" folder: one val image under another name, one test image
        (tmp_path / "new" / name).mkdir(parents=True)
        shutil.copy(root / "val" / name / "0.jpg", tmp_path / "new" / name / "fresh.jpg")
        shutil.copy(root / "test" / name / "1.jpg", tmp_path / "new" / name / "other.jpg")
    result = tlpipe("evaluate", out / "model", tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert "Warning" in result.stdout and "2 were the val split that chose its settings" in result.stdout
