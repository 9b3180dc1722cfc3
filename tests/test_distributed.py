"""DDP: ``torchrun`` with 2 CPU processes (gloo) fine-tunes one model; rank 0 alone writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from mlflow.tracking import MlflowClient


RECIPE = """
image_size: 64
batch_size: 4
num_workers: 0
strategy: full
linear: {classifiers: [logreg], c_grid: [0.1], cv_folds: 2}
finetune: {epochs: 2, patience: 5}
tuning: {trials: 0}
"""


def test_two_process_ddp_fit_completes_and_rank_0_alone_writes(tmp_path, image_folder):
    data = image_folder("data", {"red": 8, "green": 8, "blue": 8}, size=(64, 48), noise=40)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tlpipe", "fit", str(data), "--recipe", str(recipe), "--output", str(out),
               "--tracking-uri", store, "--experiment", "ddp"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["head"]["world_size"] == 2
    assert summary["head"]["epochs_run"] == 2
    assert (out / "model" / "backbone.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "checkpoint.pt"]  # no stray temp files
    assert done.stdout.count("Bundle ") == 1  # one report, from rank 0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]  # logged once per epoch, by one rank
