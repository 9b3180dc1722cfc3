"""Kill-and-resume: a fine-tune killed with SIGKILL mid-run, re-run with the same command, ends
with exactly the weights of an unbroken run (CPU, deterministic mode, same seed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from safetensors.torch import load_file

from conftest import class_color, make_image

RECIPE = """
image_size: 64
batch_size: 8
num_workers: 0
strategy: full
linear: {classifiers: [logreg], c_grid: [0.1], cv_folds: 2}
finetune: {epochs: 3, patience: 5, deterministic: true}
tuning: {trials: 0}
"""


def fit_command(data, out, recipe):
    return [sys.executable, "-m", "tlpipe", "fit", str(data), "--recipe", str(recipe), "--output", str(out)]


def test_a_killed_fine_tune_resumes_to_the_same_weights_as_an_unbroken_run(tmp_path):
    data = tmp_path / "data"
    for c, name in enumerate(["red", "green", "blue"]):
        for k in range(10):
            make_image(data / name / f"{k}.jpg", class_color(c), size=(64, 48), noise=40, seed=[c, k])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    unbroken = tmp_path / "unbroken"
    subprocess.run(fit_command(data, unbroken, recipe), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    process = subprocess.Popen(fit_command(data, killed, recipe), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)  # mid-epoch 2: epoch 1's checkpoint is on disk
    process.wait()
    provisional = json.loads((killed / "summary.json").read_text())  # anytime: the linear model came first
    assert provisional["status"] == "provisional" and provisional["strategy"] == "linear"
    assert "Saved first, while the full fine-tune runs" in provisional["strategy_reason"]  # never "asked for"

    subprocess.run(fit_command(data, killed, recipe), check=True, env=env, capture_output=True, timeout=600)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["head"]["resumed_from_epoch"] >= 1 and summary["head"]["epochs_run"] == 3
    for name in ("backbone.safetensors", "head.safetensors"):
        expected, got = load_file(str(unbroken / "model" / name)), load_file(str(killed / "model" / name))
        assert expected.keys() == got.keys()
        for key in expected:
            assert (expected[key] == got[key]).all(), (name, key)
