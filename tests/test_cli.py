"""The command line end to end on small generated datasets: real backbone, real MLflow store."""
from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import dataset, free_port, health_status, tlpipe, tree_snapshot

QUICK = ["--recipe", "quick", "--workers", "0"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit of a 3-class generated dataset (no val/ folder: held out), shared by the tests below."""
    from conftest import class_color, make_image

    root = tmp_path_factory.mktemp("data") / "shapes"
    for c, name in enumerate(["red", "green", "blue"]):
        for k in range(10):
            make_image(root / name / f"{k}.jpg", class_color(c), size=(64, 48), noise=30, seed=[c, k])
    (root / "notes.txt").write_text("not an image")
    before = tree_snapshot(root)
    out = tmp_path_factory.mktemp("run") / "out"
    result = tlpipe("fit", root, "--output", out, *QUICK)
    assert result.exit_code == 0, result.output
    assert tree_snapshot(root) == before  # the dataset folder is never written to
    return root, out, result


def test_fit_writes_summary_bundle_and_reports(fitted):
    root, out, result = fitted
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "linear" and summary["strategy_reason"]
    assert summary["splits"] == {"train": 24, "val": 6}
    assert summary["val_from"] == "split"
    assert 0.0 <= summary["val_accuracy"] <= 1.0 and summary["val_accuracy"] == summary["metrics"]["accuracy"]
    assert set(summary["timings"]) >= {"check_data", "load_backbone", "extract_codes", "train", "test_time"}
    assert summary["head"]["test_time"] == {"choice": "none", "reason": "off in the recipe (test_time: false)"}
    calibration = summary["head"]["calibration"]
    assert calibration["n_val"] == 6 and calibration["nll_after"] <= calibration["nll_before"]
    assert json.loads((out / "model" / "bundle.json").read_text())["codes"]["hflip"] is False
    assert Path(summary["bundle"]) == (out / "model").resolve()
    assert {"bundle.json", "head.safetensors"} <= {p.name for p in (out / "model").iterdir()}
    assert not any(p.suffix in (".pkl", ".pickle", ".joblib") for p in out.rglob("*"))
    assert (out / "quarantine.csv").read_text().strip() == "path,reason"
    assert "Validation: accuracy" in result.output and "Confusion matrix" in result.output


def test_fit_is_an_mlflow_run_with_params_metrics_and_artifacts(fitted, mlflow_store):
    from mlflow.tracking import MlflowClient

    _, out, _ = fitted
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "shapes"
    assert run.data.params["backbone"] == "efficientnet_lite0" and run.data.params["n_train"] == "24"
    assert run.data.params["weights_sha256"] == summary["backbone"]["sha256"]
    assert run.data.metrics["val_accuracy"] == pytest.approx(summary["val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "classification_report.json", "quarantine.csv", "summary.json"} <= artifacts
    models = client.search_logged_models([run.info.experiment_id], filter_string="name = 'model'")
    logged = [m for m in models if m.source_run_id == run.info.run_id]  # the bundle as an MLflow model, runs:/<id>/model
    assert len(logged) == 1 and [o.model_id for o in run.outputs.model_outputs] == [logged[0].model_id]
    assert summary["mlflow_model"] == f"runs:/{run.info.run_id}/model"


def test_predict_reproduces_validation_accuracy_exactly(fitted):
    root, out, _ = fitted
    summary = json.loads((out / "summary.json").read_text())
    from tlpipe.data import prepare_dataset

    spec = prepare_dataset(root, 0.2, 0)  # the same seeded split the fit made
    val = spec.splits["val"]
    result = tlpipe("predict", out / "model", *[s.path for s in val], "--format", "csv", "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    predicted = {r["path"]: r["label"] for r in rows}
    accuracy = np.mean([predicted[str(s.path)] == spec.classes[s.label] for s in val])
    assert accuracy == summary["val_accuracy"]


def test_predict_top_k_json_on_a_folder(fitted):
    root, out, _ = fitted
    result = tlpipe("predict", out / "model", root / "red", "--top-k", "3", "--format", "json", "--workers", "0")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert len(rows) == 10
    probabilities = [p["probability"] for p in rows[0]["predictions"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert {p["label"] for p in rows[0]["predictions"]} == {"red", "green", "blue"}


def test_predict_skips_unreadable_files_with_a_line_each(fitted, tmp_path):
    root, out, _ = fitted
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    good = [root / "red" / "0.jpg", root / "green" / "1.jpg", root / "blue" / "2.jpg"]
    result = tlpipe("predict", out / "model", good[0], bad, *good[1:], "--format", "csv", "--workers", "0")
    assert result.exit_code == 0, result.output
    (line,) = result.stderr.splitlines()  # one line for the bad file, none for the good ones
    assert line.startswith(f"skipped {bad}: ") and len(line) > len(f"skipped {bad}: ")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["path"] for row in rows] == [str(p) for p in good]  # every good image predicted, in order

    result = tlpipe("predict", out / "model", bad)  # nothing left to predict: an error
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == "error: no readable image among the paths given"
    assert "Traceback" not in result.output


def test_extract_npz_and_parquet(fitted, tmp_path):
    root, _, _ = fitted
    result = tlpipe("extract", root, "--out", tmp_path / "codes.npz", *QUICK)
    assert result.exit_code == 0, result.output
    codes = np.load(tmp_path / "codes.npz")  # no allow_pickle: the format needs none
    assert codes["features"].shape == (30, 1280) and codes["features"].dtype == np.float32
    assert (codes["features"] >= 0).all()
    assert list(codes["classes"]) == ["blue", "green", "red"]
    assert codes["paths"][0].endswith(".jpg") and not codes["paths"][0].startswith("/")
    assert json.loads(str(codes["meta"]))["layer"] == "penultimate"

    result = tlpipe("extract", root, "--out", tmp_path / "codes.parquet", "--layer", "-2", *QUICK)
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "codes.parquet")
    assert table.num_rows == 30 and table.schema.field("features").type.list_size == 112
    assert json.loads(table.schema.metadata[b"tlpipe"])["layer"] == "blocks.4"


def test_extract_leaves_out_a_split_whose_images_all_fail_the_check(tmp_path):
    root = dataset(tmp_path / "d", ["cats", "dogs"], split={"train": 3, "val": 2})
    (root / "test" / "cats").mkdir(parents=True)
    (root / "test" / "cats" / "broken.jpg").write_bytes(b"not an image")
    result = tlpipe("extract", root, "--out", tmp_path / "codes.npz", *QUICK)
    assert result.exit_code == 0, result.output
    codes = np.load(tmp_path / "codes.npz")
    assert sorted(set(codes["splits"])) == ["train", "val"] and codes["features"].shape[0] == 10
    assert json.loads(str(codes["meta"]))["quarantined"][0][0] == "test/cats/broken.jpg"


def test_extract_no_relu_leaves_earlier_layer_codes_signed_and_penultimate_unchanged(fitted, tmp_path):
    root, _, _ = fitted
    both = ["--layer", "penultimate+-2", "--image-size", "64", *QUICK]  # 1280 penultimate + 112 of blocks.4
    assert tlpipe("extract", root, "--out", tmp_path / "relu.npz", *both).exit_code == 0
    result = tlpipe("extract", root, "--out", tmp_path / "raw.npz", "--no-relu", *both)
    assert result.exit_code == 0, result.output
    relu, raw = np.load(tmp_path / "relu.npz"), np.load(tmp_path / "raw.npz")
    assert relu["features"].shape == raw["features"].shape == (30, 1280 + 112)
    np.testing.assert_allclose(raw["features"][:, :1280], relu["features"][:, :1280], rtol=0, atol=1e-6)
    early_relu, early_raw = relu["features"][:, 1280:], raw["features"][:, 1280:]
    assert (early_relu >= 0).all() and (early_raw < 0).any()
    assert (early_relu >= early_raw - 1e-5).all()  # the mean of max(x, 0) is never below the mean of x
    assert json.loads(str(relu["meta"]))["layer_relu"] is True
    assert json.loads(str(raw["meta"]))["layer_relu"] is False


def test_models_lists_the_offline_default():
    result = tlpipe("models")
    assert result.exit_code == 0 and "efficientnet_lite0" in result.stdout


@pytest.mark.parametrize("layout, message", [
    ("missing", "not found"),
    ("file", "not a folder"),
    ("empty", "no class folders"),
    ("one_class", "only one class"),
    ("all_bad", "class 'dogs' has no valid training image"),
    ("singleton", "at least 2 per class"),
])
def test_bad_datasets_give_one_line_and_exit_code_2(tmp_path, image_folder, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout == "empty":
        root.mkdir()
    elif layout == "one_class":
        image_folder(root, {"cats": 3})
    elif layout == "all_bad":
        image_folder(root, {"cats": 3})
        (root / "dogs").mkdir()
        (root / "dogs" / "a.jpg").write_bytes(b"")
    elif layout == "singleton":
        image_folder(root, {"cats": 3, "dogs": 1})
    result = tlpipe("fit", root, "--output", tmp_path / "out", *QUICK)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.output


def test_the_installed_command_prints_one_line_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tlpipe", "fit", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: dataset folder not found") and result.stderr.count("\n") == 1


def test_fit_needs_data_or_example(tmp_path):
    result = tlpipe("fit")
    assert result.exit_code == 2 and "--example digits" in result.stderr


def test_example_digits_is_written_as_an_image_folder(tmp_path):
    from tlpipe.examples import write_example
    from tlpipe.data import scan_folder

    scanned = scan_folder(write_example("digits", tmp_path))
    assert scanned.classes == [f"digit_{d}" for d in range(10)]
    assert sum(len(v) for v in scanned.files["train"].values()) == 1797


def other_addresses() -> set[str]:
    """This machine's IPv4 addresses outside loopback (from the interfaces, via `hostname -I`)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        out = socket.gethostbyname(socket.gethostname())
    return {a for a in out.split() if "." in a and not a.startswith("127.")}


def test_ui_serves_the_run_history_on_localhost_only(fitted, mlflow_store):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tlpipe", "ui", "--port", str(port)],
                               env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        assert health_status(port) == 200
        body = json.dumps({"max_results": 5})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                         data=body.encode(), headers={"Content-Type": "application/json"})
        names = {e["name"] for e in json.load(urllib.request.urlopen(request, timeout=10))["experiments"]}
        assert "shapes" in names  # the same store tlpipe fit wrote to
        for address in other_addresses():  # not reachable on the machine's other interfaces
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=30)


def test_fine_tuned_bundle_embeds_its_backbone_and_predict_reproduces_val_accuracy(fitted, tmp_path):
    root, _, _ = fitted
    out = tmp_path / "ft"
    result = tlpipe("fit", root, "--strategy", "partial", "--unfreeze-stages", "1", "--epochs", "1", "--trials", "2",
                    "--image-size", "64", "--batch-size", "8", "--output", out, *QUICK)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "partial" and summary["head"]["params_frozen"] > 0
    assert summary["tuning"]["trials"] == 2 and summary["tuning"]["complete"] + summary["tuning"]["pruned"] == 2
    assert summary["head"]["epochs_run"] == 1  # the best trial's checkpoint, not a second training
    assert (out / "model" / "backbone.safetensors").exists() and (out / "learning_curves.png").exists()
    assert summary["label_issues"]["network"] == "fine-tuned"  # the suspects of the network it became
    assert "label the fine-tuned network's codes contradict" in " ".join(result.output.split())
    assert "regression on the fine-tuned network" in (out / "report.html").read_text(encoding="utf-8")
    from tlpipe.data import prepare_dataset

    val = prepare_dataset(root, 0.2, 0).splits["val"]
    result = tlpipe("predict", out / "model", *[s.path for s in val], "--format", "csv", "--workers", "0")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    accuracy = np.mean([row["label"] == Path(row["path"]).parent.name for row in rows])
    assert accuracy == summary["val_accuracy"]


def test_evaluate_scores_a_bundle_on_labelled_images_like_the_fit_did(fitted, tmp_path):
    root, out, _ = fitted
    summary = json.loads((out / "summary.json").read_text())
    from tlpipe.data import prepare_dataset

    val = prepare_dataset(root, 0.2, 0).splits["val"]
    held_out = tmp_path / "val"
    for sample in val:  # the fit's held-out images, as a labelled folder
        (held_out / sample.path.parent.name).mkdir(parents=True, exist_ok=True)
        (held_out / sample.path.parent.name / sample.path.name).write_bytes(sample.path.read_bytes())
    result = tlpipe("evaluate", out / "model", held_out, "--json-file", tmp_path / "m.json", "--workers", "0",
                    "--plots", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"reliability.png", "confusion_matrix.png"}
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_images"] == len(val) and metrics["accuracy"] == summary["val_accuracy"]
    # a flat folder is scored whole, and never called the train split
    assert metrics["split"] == "all images" and metrics["data"] == str(held_out)
    assert f"Scored all {len(val)} images of {held_out} " in result.stdout and "All images: accuracy" in result.stdout
    assert metrics["accuracy_ci"][0] <= metrics["accuracy"] <= metrics["accuracy_ci"][1] and 0 <= metrics["ece"] <= 1
    scripted = tlpipe("evaluate", out / "model", held_out, "--json", "--workers", "0")
    assert json.loads(scripted.stdout)["accuracy"] == metrics["accuracy"]  # --json: the metrics alone on stdout
    result = tlpipe("evaluate", out / "model", held_out, "--split", "test")
    assert result.exit_code == 2 and "drop --split" in result.stderr and result.stderr.count("\n") == 1


def test_fit_report_ends_with_the_commands_to_run_next(fitted):
    _, out, result = fitted
    lines = [line.strip() for line in result.stdout.splitlines()]
    bundle = str((out / "model").resolve())
    commands = [shlex.split(line, comments=True) for line in lines[lines.index("Next") + 1:]]
    assert commands == [["tlpipe", "predict", bundle, "IMAGES..."], ["tlpipe", "evaluate", bundle, "LABELLED_FOLDER"],
                        ["tlpipe", "export", bundle, "--format", "onnx"], ["tlpipe", "serve", str(out.resolve())],
                        ["tlpipe", "ui"]]  # the run's store is the default one: ui needs no --tracking-uri


def test_next_commands_survive_spaces_quotes_and_unicode_in_paths(fitted, capsys, mlflow_store):
    from tlpipe.run.report import print_next_steps

    _, out, _ = fitted
    summary = json.loads((out / "summary.json").read_text())
    odd = "/tmp/my runs/naïve 'cats' & $dogs"
    summary.update(bundle=f"{odd}/model", data=f"{odd}/data", splits={"train": 24, "val": 6, "test": 6},
                   tracking_uri=f"sqlite:///{odd}/mlflow.db")
    capsys.readouterr()
    print_next_steps(summary)
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line, comments=True) for line in lines[lines.index("Next") + 1:]]
    assert commands[0][:3] == ["tlpipe", "predict", f"{odd}/model"]
    assert commands[1] == ["tlpipe", "evaluate", f"{odd}/model", f"{odd}/data"]  # scores its test/ split
    assert commands[3] == ["tlpipe", "serve", odd]
    assert commands[4] == ["tlpipe", "ui", "--tracking-uri", f"sqlite:///{odd}/mlflow.db"]  # not the default store


@pytest.fixture
def bundle_copy(fitted, tmp_path):
    """The fitted bundle, copied to be damaged."""
    copy = tmp_path / "model"
    shutil.copytree(fitted[1] / "model", copy)
    return copy


def _edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    edit(manifest)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


def _nudge_first_float_tensor(file: Path) -> None:
    """A still valid safetensors file with one weight changed: it would load and predict otherwise."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(file))


@pytest.mark.parametrize("damage, message", [
    ("head", "head.safetensors does not match the checksum bundle.json records"),
    ("missing_head", "head.safetensors is missing"),
    ("pretrained_checksum", "bundle.json records efficientnet_lite0 weights with checksum 000000000000"),
    ("newer_format", "bundle.json has bundle format 99 (written by tlpipe 9.0.0)"),
    ("not_json", "bundle.json is not valid JSON"),
    ("not_a_bundle", "is not a tlpipe model bundle (no bundle.json)"),
])
def test_a_damaged_bundle_is_refused_in_one_line_naming_the_file(bundle_copy, fitted, damage, message):
    root = fitted[0]
    if damage == "head":
        _nudge_first_float_tensor(bundle_copy / "head.safetensors")
    elif damage == "missing_head":
        (bundle_copy / "head.safetensors").unlink()
    elif damage == "pretrained_checksum":
        _edit_manifest(bundle_copy, lambda m: m["backbone"].update(sha256="0" * 64))
    elif damage == "newer_format":
        _edit_manifest(bundle_copy, lambda m: m.update(format=99, tlpipe_version="9.0.0"))
    elif damage == "not_json":
        (bundle_copy / "bundle.json").write_text('{"format": 2, ')
    elif damage == "not_a_bundle":
        (bundle_copy / "bundle.json").unlink()
    result = tlpipe("predict", bundle_copy, root / "red" / "0.jpg", "--device", "cpu")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr and str(bundle_copy) in result.stderr


def test_an_altered_embedded_backbone_is_refused(fitted, tmp_path):
    from safetensors.torch import load_file

    from tlpipe.bundle.folder import BACKBONE_FILE, load_bundle, save_bundle
    from tlpipe.errors import TlpipeError

    loaded = load_bundle(fitted[1] / "model", "cpu")
    manifest = loaded.manifest  # saved again as a fine-tuned bundle is: the backbone's weights embedded
    path = save_bundle(tmp_path / "embedded", loaded.backbone, loaded.head, loaded.classes, layer=manifest["codes"]["layer"],
                       layer_relu=manifest["codes"]["relu"], config=manifest["config"], metrics=manifest["metrics"], trained=True)
    assert load_file(str(path / BACKBONE_FILE)) and load_bundle(path, "cpu").classes == loaded.classes  # as saved: fine
    _nudge_first_float_tensor(path / BACKBONE_FILE)
    with pytest.raises(TlpipeError, match=f"{path / BACKBONE_FILE} holds weights with checksum .* the bundle was altered"):
        load_bundle(path, "cpu")


def test_a_worker_runs_the_trials_the_lead_left_queued_when_its_timeout_ran_out(fitted, tmp_path):
    import optuna

    root, _, _ = fitted
    storage, cheap = f"sqlite:///{tmp_path / 'study.db'}", ["--image-size", "64", *QUICK]
    shared = ["--storage", storage, "--study-name", "s1"]
    lead = tlpipe("fit", root, "--strategy", "linear", "--trials", "4", "--timeout", "0.001", *shared, "-o", tmp_path / "lead", *cheap)
    assert lead.exit_code == 0, lead.output
    tuning = json.loads((tmp_path / "lead" / "summary.json").read_text())["tuning"]
    assert tuning["trials"] == 4 and tuning["complete"] <= 1 and tuning["waiting"] == 4 - tuning["complete"]
    assert "still queued" in lead.stdout  # the report says trials are left for a re-run or a worker

    worker = tlpipe("fit", root, "--worker", *shared, "-o", tmp_path / "w1")
    assert worker.exit_code == 0, worker.output
    assert worker.stdout.strip() == "worker done: study s1 has 4 trials (4 complete, 0 pruned)"
    study = optuna.load_study(study_name="s1", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4  # exactly the 4 asked for
