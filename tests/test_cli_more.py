"""The command line's choices and misuse (no fit needed), and ``fit --example digits`` end to end."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tlpipe
from tlpipe.config import available_recipes

WIDE = {"COLUMNS": "200"}  # help and error panels unwrapped, so a choice is never split across lines


def test_fit_help_lists_the_strategies_recipes_and_device_forms():
    result = tlpipe("fit", "--help", env=WIDE)
    assert result.exit_code == 0
    assert "auto|linear|partial|full" in result.stdout and "auto (chosen from" in result.stdout
    assert all(name in result.stdout for name in available_recipes()) and "YAML" in result.stdout
    assert "cuda:N" in result.stdout and "none (random init)" in result.stdout and "<digits>" in result.stdout
    assert "--path-col" in result.stdout and ".csv, .tsv, .parquet" in result.stdout  # a table is a dataset too


@pytest.mark.parametrize("command", [[], ["fit"], ["evaluate"], ["export"], ["inspect"]])
def test_help_lists_flags_without_a_value_to_give(command):
    """``--json <bool>`` would invite ``--json true``, which fails: a flag takes no value."""
    result = tlpipe(*command, "--help", env=WIDE)
    assert result.exit_code == 0 and "--help" in result.stdout and "<bool>" not in result.stdout


@pytest.mark.parametrize("args, flag, hint", [
    (["fit", "data", "--strategy", "linaer"], "--strategy", "'auto', 'linear', 'partial', 'full'"),
    (["fit", "data", "--device", "gpu"], "--device", "cuda:N"),
    (["predict", "model", "a.jpg", "--device", "cuda:one"], "--device", "cuda:N"),
    (["fit", "data", "--weights", "imagenet"], "--weights", "none (random init)"),
    (["fit", "--example", "digit"], "--example", "'digits'"),
])
def test_a_typo_in_a_choice_names_the_flag_and_what_it_accepts(args, flag, hint):
    result = tlpipe(*args, env=WIDE)
    assert result.exit_code == 2
    assert f"Invalid value for '{flag}'" in result.stderr and hint in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--example", "digits", "--worker", "--storage", "sqlite:///s.db", "--study-name", "s", "-o", "w"],
     "--worker needs the dataset folder the lead fit used"),
    (["data", "--worker", "--study-name", "s", "-o", "w"], "--worker needs --storage, --study-name and --output"),
])
def test_worker_misuse_is_one_line(args, message):
    result = tlpipe("fit", *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_example_digits_fits_and_predicts_end_to_end(tmp_path):
    """All 1,797 digits: --layer -2 (112-wide codes) and 64 px keep it about 10 s on a CPU."""
    out = tmp_path / "digits run"  # a space: the report's commands must still paste as they are
    result = tlpipe("fit", "--example", "digits", "--strategy", "linear", "--trials", "0", "--image-size", "64",
                    "--layer", "-2", "--output", out, "--recipe", "quick", "--workers", "0")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == [f"digit_{d}" for d in range(10)] and sum(summary["splits"].values()) == 1797
    assert summary["val_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert summary["skipped"] == {} and "Skipped" not in result.stdout  # nothing in the example is left out
    manifest = json.loads((out / "model" / "bundle.json").read_text())
    assert manifest["classes"] == summary["classes"]  # the bundle predicts the fit's classes, in its order

    image = sorted((out / "example-digits" / "digit_3").glob("*.png"))[0]
    lines = [line.strip() for line in result.stdout.splitlines()]
    predict = shlex.split(next(line for line in lines if line.startswith("tlpipe predict ")), comments=True)
    assert predict[:3] == ["tlpipe", "predict", str((out / "model").resolve())] and predict[3] == "IMAGES..."
    result = tlpipe(*predict[1:3], image, "--format", "json", "--workers", "0")  # the report's command, pasted
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["path"] == str(image) and row["predictions"][0]["label"] in summary["classes"]


def test_every_package_of_tlpipe_is_in_the_wheel():
    """pyproject.toml lists the packages by hand: one left out (tlpipe.cli, once) installs a tlpipe
    without it, which the editable install of the tests would never notice."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "tlpipe").rglob("__init__.py")}
    assert listed == found


def test_a_mistyped_dataset_folder_is_told_before_torch_is_imported(tmp_path):
    """The first answer comes at once: no torch, albumentations or MLflow is loaded to say a path is wrong."""
    code = ("import sys\nfrom tlpipe.cli import app\ntry:\n    app(['fit', sys.argv[1]])\nexcept SystemExit as exc:\n"
            "    print(exc.code, sorted(m for m in ('torch', 'albumentations', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[0] == "2 []", done.stdout + done.stderr
    assert done.stderr.startswith(f"error: dataset folder not found: {tmp_path / 'missing'}") and done.stderr.count("\n") == 1


def test_predicting_with_a_bundle_loads_no_training_library(bundle_dir):
    """``tlpipe predict`` waits only for what a prediction runs on (torch, timm): scikit-learn,
    albumentations, MLflow and Optuna are the fit's, and cost seconds to import."""
    root, bundle = bundle_dir
    code = ("import sys\nfrom tlpipe.bundle.folder import load_bundle\n"
            f"print(load_bundle({str(bundle)!r}, 'cpu').predict([{str(root / 'cats' / '0.jpg')!r}], workers=0)[0].labels)\n"
            "print(sorted(m for m in ('sklearn', 'albumentations', 'mlflow', 'optuna') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["['cats']", "[]"], done.stdout + done.stderr
