"""DDP: ``torchrun`` with 2 CPU processes (gloo) fine-tunes one model, rank 0 alone writing; the frozen
pass sharded over the ranks gives the codes of one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from mlflow.tracking import MlflowClient

from conftest import free_port


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
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["batch.json", "best.pt", "checkpoint.pt"]  # no stray temp files
    assert done.stdout.count("Bundle ") == 1  # one report, from rank 0
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]  # logged once per epoch, by one rank


def test_a_ddp_fine_tune_that_does_not_learn_ends_with_rank_0_saving_the_linear_classifier(tmp_path, image_folder):
    data = image_folder("data", {"red": 8, "green": 8, "blue": 8}, size=(64, 48), noise=40)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.replace("epochs: 2, patience: 5", "epochs: 2, patience: 5, lr: 50.0"))  # AdamW at 50 cannot learn
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tlpipe", "fit", str(data), "--recipe", str(recipe), "--output", str(out),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["strategy"] == "linear"
    assert summary["head"]["finetune_fallback"].startswith("The fine-tune did not learn")


SHARDED_PASS = """
import sys

import numpy as np
import numpy as np
import torch
from tlpipe.config import load_config
from tlpipe.data import prepare_dataset
from tlpipe.models import build_backbone, dataset_codes
from tlpipe.training.distributed import distributed
import tlpipe.models.features as features

loaded, load = [], features.eval_loader  # how many images this process decodes
features.eval_loader = lambda samples, *args: (loaded.append(len(samples)), load(samples, *args))[1]
config = load_config("quick", device="cpu", num_workers=0, batch_size=4)
spec = prepare_dataset(sys.argv[1], config.val_fraction, config.seed)
with distributed(torch.device("cpu")) as ranks:
    backbone = build_backbone(config)
    codes, labels = dataset_codes(backbone, spec, "train", config, ranks=ranks)
    val_codes, _ = dataset_codes(backbone, spec, "val", config, ranks=ranks)  # one batch: fewer than the ranks
    np.savez(f"{sys.argv[2]}-rank{ranks.rank}.npz", codes=codes, labels=labels, val=val_codes, loaded=loaded)
"""


def test_a_frozen_pass_over_two_hosts_gives_every_rank_the_codes_of_one_process(tmp_path, image_folder):
    """The README's multi-host recipe: one torchrun a host, here two on this machine over gloo."""
    data = image_folder("data", {"red": 6, "green": 5, "blue": 6}, size=(48, 40), noise=40)  # 13 train: 4 batches
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_PASS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both runs: oneDNN's sums follow them
    done = subprocess.run([sys.executable, str(script), str(data), str(tmp_path / "one")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    port = free_port()
    hosts = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(script), str(data), str(tmp_path / "two")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for host in hosts:
        _, stderr = host.communicate(timeout=300)
        assert host.returncode == 0, stderr[-3000:]
    one = np.load(tmp_path / "one-rank0.npz")
    for rank in (0, 1):
        two = np.load(tmp_path / f"two-rank{rank}.npz")
        assert np.array_equal(two["labels"], one["labels"]) and np.array_equal(two["codes"], one["codes"])
        assert np.array_equal(two["val"], one["val"])
        assert two["loaded"].tolist() == [[8, 4], [5, 4]][rank]  # train: batches 1 and 3 of 4, 2 and 4; val: all
    assert len(one["labels"]) == 13 and one["loaded"].tolist() == [13, 4]
