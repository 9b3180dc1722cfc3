"""Faults and hostile input: each gets success or one clear line (exit 2), never a traceback.

Tiny generated datasets, the linear strategy and no tuning keep each fit to seconds; the MLflow
store, the lock files and the processes are real.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, dataset, health_status, make_image, one_line, servers_on, tlpipe
from tlpipe.errors import TlpipeError

ODD = ["bees (apis)", "fourmis été 🐜", "[bold]red"]


def test_any_class_name_trains_logs_and_predicts_under_its_real_name(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    root = dataset(tmp_path / "odd", ODD)
    result = tlpipe("fit", root, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert "[bold]red" in result.stdout  # printed as data, not as terminal markup
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["classes"] == sorted(ODD) and set(summary["metrics"]["per_class"]) == set(ODD)
    bundle = json.loads((tmp_path / "out" / "model" / "bundle.json").read_text())
    assert bundle["classes"] == sorted(ODD)
    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["run_id"])
    keys = {k for k in run.data.metrics if k.startswith("val_f1_")}
    assert len(keys) == 3 and "val_f1_bees (apis)" not in keys
    mapping = json.loads(Path(client.download_artifacts(run.info.run_id, "mlflow_keys.json", str(tmp_path))).read_text())
    assert {mapping[k] for k in keys} == {f"val_f1_{name}" for name in ODD}
    predicted = tlpipe("predict", tmp_path / "out" / "model", root / "fourmis été 🐜" / "0.jpg", "--format", "json")
    assert json.loads(predicted.stdout)[0]["predictions"][0]["label"] == "fourmis été 🐜"


def test_class_names_the_plot_font_cannot_draw_are_spelled_out_not_drawn_as_boxes(tmp_path):
    """An emoji or a CJK name in the confusion matrix and the precision-recall legend: written as its
    Unicode name or code point, with no 'Glyph missing' warning (an empty box in the picture)."""
    from tlpipe.bundle.metrics import save_confusion_matrix, save_pr_curves

    names = ["fourmis été 🐜", "日本", "bees"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_confusion_matrix(np.eye(3, dtype=int).tolist(), names, tmp_path / "matrix.png")
        save_pr_curves(np.eye(3, dtype=bool), np.eye(3) * 0.8 + 0.1, names, tmp_path / "pr.png")
    assert (tmp_path / "matrix.png").stat().st_size > 0 and (tmp_path / "pr.png").stat().st_size > 0


def test_a_control_character_in_a_class_folder_is_one_line_naming_it(tmp_path):
    root = dataset(tmp_path / "d", ["cats", "dogs\nnew"])
    one_line(tlpipe("fit", root, "-o", tmp_path / "out", *FAST), "'dogs\\nnew'", "rename the folder")


def test_mlflow_keys_are_collision_free_and_accepted(mlflow_store):
    from mlflow.tracking import MlflowClient

    from tlpipe.run.tracking import mlflow_key

    assert mlflow_key("val_f1_cats") == "val_f1_cats"
    names = ["a (b)", "a [b]", "a/../b", "/abs", "x" * 300, "été", "🐜", "🐝"]
    keys = [mlflow_key(n) for n in names]
    assert len(set(keys)) == len(keys) and keys[names.index("été")] == "été"
    client = MlflowClient(mlflow_store)  # MLflow's own check, as a fit meets it: a refused key raises
    run_id = client.create_run(client.create_experiment("mlflow-keys")).info.run_id
    for key in keys:
        client.log_metric(run_id, key, 1.0)
    assert set(client.get_run(run_id).data.metrics) == set(keys)


RACE_CODE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tlpipe.run.tracking import FitRun
    folder, stores, racers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    try:
        for store in range(stores):  # imported once; then every racer opens each new store at the same moment
            (folder / f"ready-{store}-{sys.argv[4]}").touch()
            deadline = time.monotonic() + 60
            while len(list(folder.glob(f"ready-{store}-*"))) < racers and time.monotonic() < deadline:
                time.sleep(0.01)
            with FitRun("race", f"sqlite:///{folder / f'store{store}.db'}") as run:
                run.log_metrics({"val_accuracy": 1.0})
    finally:  # a racer that failed lets the others past every barrier
        for store in range(stores):
            (folder / f"ready-{store}-{sys.argv[4]}").touch()
""")


def test_fits_started_together_on_a_new_sqlite_store_all_succeed(tmp_path):
    """The store's creation and migration, raced by four processes at once (a barrier after their
    imports), on three new stores: every one succeeds."""
    from mlflow.tracking import MlflowClient

    stores, racers = 3, 4
    processes = [subprocess.Popen([sys.executable, "-c", RACE_CODE, str(tmp_path), str(stores), str(racers), str(k)],
                                  stderr=subprocess.PIPE, text=True) for k in range(racers)]
    try:
        errors = [p.communicate(timeout=300)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0] * racers, errors
    for store in range(stores):
        client = MlflowClient(f"sqlite:///{tmp_path / f'store{store}.db'}")
        runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
        assert len(runs) == racers and {r.info.status for r in runs} == {"FINISHED"}


HOLD_CODE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tlpipe.config import load_config
    from tlpipe.data.source import as_source
    from tlpipe.run.folder import RunFolder, fit_key
    config = load_config("default", strategy="linear", num_workers=0, device="cpu")  # what FAST asks for
    data = as_source(sys.argv[2])
    with RunFolder(Path(sys.argv[1])).claim(data, fit_key(data, config)):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_busy_output_folder_names_the_fit_holding_it(tmp_path):
    root = dataset(tmp_path / "d", ["cats", "dogs"])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CODE, str(tmp_path / "out"), str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line(tlpipe("fit", root, "-o", tmp_path / "out", *FAST), "is in use by another tlpipe fit", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert tlpipe("fit", root, "-o", tmp_path / "out", *FAST).exit_code == 0  # the dead holder's lock is gone with it


def test_a_finished_folder_of_other_data_is_refused_unless_overwrite(tmp_path):
    first, second = dataset(tmp_path / "a", ["cats", "dogs"]), dataset(tmp_path / "b", ["red", "green"])
    out = tmp_path / "out"
    assert tlpipe("fit", first, "-o", out, *FAST).exit_code == 0
    assert tlpipe("fit", first, "-o", out, *FAST).exit_code == 0  # the same fit again: fine
    one_line(tlpipe("fit", second, "-o", out, *FAST), "holds a fit of", "--overwrite")
    assert json.loads((out / "summary.json").read_text())["classes"] == ["cats", "dogs"]  # untouched
    (out / "my notes.txt").write_text("mine")
    assert tlpipe("fit", second, "-o", out, *FAST, "--overwrite").exit_code == 0
    assert json.loads((out / "summary.json").read_text())["classes"] == ["green", "red"]
    assert (out / "my notes.txt").read_text() == "mine"  # --overwrite removes the fit's own files, nothing else


def test_a_folder_holding_a_users_files_of_a_fits_names_is_refused_unless_overwrite(tmp_path):
    root, out = dataset(tmp_path / "d", ["cats", "dogs"]), tmp_path / "project"
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    (out / "model").mkdir()
    (out / "model" / "weights.bin").write_bytes(b"mine")
    one_line(tlpipe("fit", root, "-o", out, *FAST), "holds model, config.yaml, not written by a tlpipe fit", "--overwrite")
    assert (out / "config.yaml").read_text() == "mine: true\n" and (out / "model" / "weights.bin").read_bytes() == b"mine"
    assert tlpipe("fit", root, "-o", out, *FAST, "--overwrite").exit_code == 0
    assert json.loads((out / "summary.json").read_text())["classes"] == ["cats", "dogs"]


def test_a_rerun_cut_before_it_saved_a_model_leaves_the_finished_fit_whole(tmp_path):
    from tlpipe.run.outputs import write_cut_summary
    from tlpipe.run.tracking import FitRun

    root, out = dataset(tmp_path / "d", ["cats", "dogs"]), tmp_path / "out"
    assert tlpipe("fit", root, "-o", out, *FAST).exit_code == 0
    finished = json.loads((out / "summary.json").read_text())
    with FitRun("rerun", f"sqlite:///{tmp_path / 'mlflow.db'}") as run:  # a re-run for more trials, stopped while tuning
        assert write_cut_summary(out, "stopped by SIGTERM", {"tune": 3.0}, run) == out / "model"
    summary = json.loads((out / "summary.json").read_text())
    assert {**summary, "last_cut": None} == {**finished, "last_cut": None} and summary["last_cut"]["cut"] == "stopped by SIGTERM"
    assert tlpipe("report", out).exit_code == 0  # the record readers still read a finished fit


def test_a_fit_that_failed_is_rerun_on_corrected_data_without_overwrite(tmp_path):
    root, out = dataset(tmp_path / "d", ["cats", "dogs"]), tmp_path / "out"
    (root / "dogs").rename(tmp_path / "dogs")
    one_line(tlpipe("fit", root, "-o", out, *FAST), "class")
    (tmp_path / "dogs").rename(root / "dogs")
    assert tlpipe("fit", root, "-o", out, *FAST).exit_code == 0


@pytest.mark.parametrize("where", ["inside_dataset", "a_file", "unwritable", "example_into_a_file"])
def test_output_paths_that_cannot_be_used_are_one_line(tmp_path, where):
    root = dataset(tmp_path / "d", ["cats", "dogs"])
    out = {"inside_dataset": root / "out", "a_file": tmp_path / "file.txt", "unwritable": Path("/proc/tlpipe-out"),
           "example_into_a_file": tmp_path / "file.txt"}[where]
    if where in ("a_file", "example_into_a_file"):
        out.write_text("mine")
    message = {"inside_dataset": "is inside the dataset folder", "a_file": "is a file, not a folder",
               "unwritable": "cannot write --output", "example_into_a_file": "is a file, not a folder"}[where]
    given = ["--example", "digits"] if where == "example_into_a_file" else [root]
    one_line(tlpipe("fit", *given, "-o", out, *FAST), message)
    assert not (root / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders: covered by /proc above")
def test_a_read_only_output_folder_is_one_line(tmp_path):
    root = dataset(tmp_path / "d", ["cats", "dogs"])
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    one_line(tlpipe("fit", root, "-o", out, *FAST), "cannot write --output")


def test_one_train_image_per_class_fits_without_cross_validation(tmp_path):
    root = dataset(tmp_path / "d", [f"class {i}" for i in range(40)], per_class=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tlpipe("fit", root, "-o", tmp_path / "out", *FAST)
    assert not [w for w in caught if "could represent a regression" in str(w.message)]  # 18 lines of it on stderr
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["splits"] == {"train": 40, "val": 40} and "no cross-validation" in summary["head"]["cv_note"]
    assert summary["warnings"] == ["no unknown-image detector in this model (one train image a class: no spread to "
                                   "measure distance by): predict answers a class for every image"]
    assert "Warning no unknown-image detector" in " ".join(result.output.split())


def test_a_class_missing_from_val_is_named_and_the_fit_goes_on(tmp_path):
    root = dataset(tmp_path / "d", ["ants", "bees", "wasps"], split={"train": 6, "val": 2})
    for image in (root / "val" / "wasps").iterdir():
        image.unlink()
    (root / "val" / "wasps").rmdir()
    for image in list((root / "train" / "wasps").iterdir())[1:]:
        image.unlink()  # one train image: no cross-validation either
    result = tlpipe("fit", root, "-o", tmp_path / "out", *FAST)
    assert result.exit_code == 0, result.output
    assert "'wasps' have no image in val/" in result.stdout


def test_symlinks_inside_are_followed_and_links_out_or_looping_are_counted(tmp_path):
    from tlpipe.data import prepare_dataset

    root = dataset(tmp_path / "d", ["cats", "dogs"])
    outside = make_image(tmp_path / "elsewhere" / "x.jpg", (0, 0, 0))
    (root / "cats" / "outside.jpg").symlink_to(outside)
    (root / "cats" / "loop").symlink_to(root / "cats")
    (root / "cats" / "up").symlink_to(root)
    (root / "dogs" / "more").symlink_to(tmp_path / "elsewhere")
    (root / "dogs" / "alias.jpg").symlink_to(root / "dogs" / "0.jpg")
    spec = prepare_dataset(root, hold_out=False)
    assert spec.class_counts() == {"cats": 6, "dogs": 7}
    assert spec.skipped == {"symbolic link leaving the dataset": 2, "symbolic link loop": 2}
    for image in (root / "cats").glob("*.jpg"):  # every image a link out (git-annex, DVC): the error says why
        if not image.is_symlink():
            image.rename(tmp_path / "elsewhere" / image.name)
            image.symlink_to(tmp_path / "elsewhere" / image.name)
    with pytest.raises(TlpipeError, match=r"class 'cats' has no valid training image: it has no image files "
                                          r"\(skipped in the dataset: 8 symbolic link leaving the dataset, 2 symbolic link loop\)"):
        prepare_dataset(root, hold_out=False)


def test_sigkill_then_the_same_command_leaves_no_running_run(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    root = dataset(tmp_path / "d", ["cats", "dogs", "birds"], per_class=12)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tlpipe", "fit", str(root), "-o", str(out), "--strategy", "partial", "--epochs", "3",
               "--trials", "0", "--workers", "0", "--image-size", "64", "--device", "cpu"]
    fit = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.glob("checkpoints/*.pt")):
        time.sleep(0.2)
    fit.send_signal(signal.SIGKILL)
    fit.wait()
    run_id = json.loads((out / ".tlpipe-fit.json").read_text())["run_id"]
    client = MlflowClient(mlflow_store)
    assert client.get_run(run_id).info.status == "RUNNING"  # a ghost, until the fit runs again
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == run_id and client.get_run(run_id).info.status == "FINISHED"
    experiment = client.get_run(run_id).info.experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert not list(out.rglob(".*.tmp"))


def _manifest(bundle: Path, edit=None) -> dict:
    manifest = json.loads((bundle / "bundle.json").read_text())
    if edit:
        edit(manifest)
        (bundle / "bundle.json").write_text(json.dumps(manifest))
    return manifest


def _head(bundle: Path, data: bytes) -> None:
    """A new head file, its checksum recorded: the checksum cannot be what catches it."""
    import hashlib

    (bundle / "head.safetensors").write_bytes(data)
    _manifest(bundle, lambda m: m["head"].update(sha256=hashlib.sha256(data).hexdigest()))


def _head_tensors(bundle: Path, edit) -> None:
    from safetensors.torch import load_file, save

    tensors = load_file(str(bundle / "head.safetensors"))
    edit(tensors)
    _head(bundle, save(tensors))


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ.get('TMPDIR', '/tmp')) / 'tlpipe-pwned'}",))


TAMPERING = {
    "empty manifest": (lambda b: (b / "bundle.json").write_text(""), "bundle.json is not valid JSON"),
    "non-UTF-8 manifest": (lambda b: (b / "bundle.json").write_bytes(b"\xff\xfe{"), "bundle.json is not valid JSON"),
    "a JSON list": (lambda b: (b / "bundle.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    "no classes": (lambda b: _manifest(b, lambda m: m.pop("classes")), "bundle.json classes: Field required"),
    "no classes at all": (lambda b: _manifest(b, lambda m: m.update(classes=[])), "classes: List should have at least 2"),
    "format as a string": (lambda b: _manifest(b, lambda m: m.update(format="2")), "format: Input should be a valid integer"),
    "negative input size": (lambda b: _manifest(b, lambda m: m["data_config"].update(input_size=[3, -224, 224])),
                            "data_config.input_size"),
    "random bytes as head": (lambda b: _head(b, os.urandom(512)), "head.safetensors is not a readable safetensors file"),
    "a pickle as head": (lambda b: _head(b, __import__("pickle").dumps(_Boom())), "is not a readable safetensors file"),
    "a head tensor removed": (lambda b: _head_tensors(b, lambda t: t.pop("bias")), "head.safetensors has no 'bias' tensor"),
    "a head of the wrong width": (lambda b: _head_tensors(b, lambda t: t.update(weight=t["weight"][:, :100].contiguous())),
                                  "takes codes of 100 values"),
    "3 names for a 2-row head": (lambda b: _manifest(b, lambda m: m.update(classes=["a", "b", "c"])),
                                 "'weight' has shape (2, 1280), where 3 classes need (3, 'any')"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_a_tampered_bundle_is_one_line_never_a_traceback_or_wrong_labels(bundle_dir, tmp_path, case):
    import shutil

    root, bundle = bundle_dir
    copy = tmp_path / "model"
    shutil.copytree(bundle, copy)
    damage, message = TAMPERING[case]
    damage(copy)
    result = tlpipe("predict", copy, root / "cats" / "0.jpg", "--device", "cpu")
    one_line(result, message, str(copy))
    assert not (Path(os.environ.get("TMPDIR", "/tmp")) / "tlpipe-pwned").exists()  # the pickle never ran


def test_test_time_options_that_cannot_pay_are_not_kept(bundle_dir):
    """Solid colours look the same mirrored and larger: flip averaging and a larger test resolution
    are both tried on val (the default recipe) and neither is kept."""
    summary = json.loads((bundle_dir[1].parent / "summary.json").read_text())
    test_time = summary["head"]["test_time"]
    (larger,) = set(test_time["options"]) - {"hflip"}
    side = json.loads((bundle_dir[1] / "bundle.json").read_text())["data_config"]["input_size"][-1]
    assert int(larger.split()[0]) > side and test_time["options"]["hflip"]["gain"] == 0
    assert test_time["choice"] == "none" and not test_time["hflip"]
    assert json.loads((bundle_dir[1] / "bundle.json").read_text())["codes"]["hflip"] is False


def test_a_weights_file_in_a_bundle_is_found_beside_it_from_any_folder(bundle_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import save_file

    from tlpipe.models import create_backbone, feature_state_dict

    root, bundle = bundle_dir
    copy = tmp_path / "moved" / "model"
    shutil.copytree(bundle, copy)
    save_file({k: v.contiguous() for k, v in feature_state_dict(create_backbone().model).items()}, str(copy / "weights.safetensors"))
    _manifest(copy, lambda m: m["backbone"]["weights"].update(kind="file", location="weights.safetensors"))
    monkeypatch.chdir(tmp_path)
    result = tlpipe("predict", copy, root / "cats" / "0.jpg", "--format", "json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["predictions"][0]["label"] == "cats"


def test_tlpipe_ui_owns_its_server_and_a_busy_port_is_one_line(mlflow_store):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "tlpipe", "ui", "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert "/#/experiments/" in ui.stdout.readline()  # the runs page, not MLflow 3's front page
        assert health_status(port) == 200 and servers_on(port)
        private = Path(tempfile.gettempdir()) / f"tlpipe-{os.getuid()}"  # the server's log: in a folder of this user's alone
        assert (private / f"ui-{port}.log").is_file() and private.stat().st_mode & 0o777 == 0o700
        one_line(tlpipe("ui", "--port", port), f"cannot serve on 127.0.0.1:{port}", "give --port")
        one_line(tlpipe("ui", "--host", "no-such-host.invalid"), "cannot serve on no-such-host.invalid", "give --host")
        assert tlpipe("ui", "--port", 70000).exit_code == 2 and tlpipe("serve", ".", "--port", 0).exit_code == 2  # Typer's usage
        ui.send_signal(signal.SIGTERM)  # to tlpipe alone, as a service manager sends it
        assert ui.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and servers_on(port):
            time.sleep(0.5)
        assert servers_on(port) == []
    finally:
        ui.kill()
        for pid in servers_on(port):
            os.kill(pid, signal.SIGKILL)


def test_a_run_whose_fit_died_is_ended_by_the_next_fit_on_the_store(tmp_path):
    from mlflow.tracking import MlflowClient

    from tlpipe.run.tracking import FitRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import os, sys\nfrom tlpipe.run.tracking import FitRun\nrun = FitRun('ghosts', sys.argv[1]).__enter__()\n" \
           "print(run.run_id, flush=True)\nos.kill(os.getpid(), 9)"
    died = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=120)
    ghost = died.stdout.strip()
    client = MlflowClient(uri)
    assert died.returncode == -signal.SIGKILL and client.get_run(ghost).info.status == "RUNNING"
    with FitRun("ghosts", uri) as alive:
        assert client.get_run(ghost).info.status == "KILLED"
        assert client.get_run(alive.run_id).info.status == "RUNNING"  # this process's own run is left alone


def test_hidden_and_temporary_files_never_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from tlpipe.run.tracking import FitRun

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "bundle.json").write_text("{}")
    (folder / "sub" / "head.safetensors").write_bytes(b"x")
    (folder / ".bundle.json.1234.tmp").write_text("{")
    (folder / ".hidden" ).mkdir()
    (folder / ".hidden" / "x").write_text("x")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with FitRun("artifacts", uri) as run:
        run.log_artifact(folder, "model")
    client = MlflowClient(uri)
    listed = [a.path for a in client.list_artifacts(run.run_id, "model")]
    assert listed == ["model/bundle.json", "model/sub"]
    assert [a.path for a in client.list_artifacts(run.run_id, "model/sub")] == ["model/sub/head.safetensors"]


def test_a_sigkill_between_the_bundle_swap_and_the_summary_is_made_whole_on_the_next_start(bundle_dir, tmp_path):
    """The staged summary names the bundle swapped in: finished; naming one that never came: dropped."""
    import shutil

    from tlpipe.run.folder import RunFolder, bundle_identity

    out = tmp_path / "out"
    STAGED_REPORTS, STAGED_SUMMARY = RunFolder.STAGED_REPORTS, RunFolder.STAGED_SUMMARY
    shutil.copytree(bundle_dir[1], out / "model")
    (out / "summary.json").write_text(json.dumps({"status": "provisional", "bundle_sha256": "old"}))
    (out / "classification_report.json").write_text('{"accuracy": 0.5}')
    (out / STAGED_REPORTS).mkdir()
    (out / STAGED_REPORTS / "classification_report.json").write_text('{"accuracy": 0.9}')
    (out / STAGED_SUMMARY).write_text(json.dumps({"status": "complete", "bundle_sha256": bundle_identity(out / "model")}))
    RunFolder(out).restore()
    assert json.loads((out / "summary.json").read_text())["status"] == "complete" and not (out / STAGED_SUMMARY).exists()
    assert json.loads((out / "classification_report.json").read_text())["accuracy"] == 0.9  # its reports moved in with it
    assert not (out / STAGED_REPORTS).exists()
    (out / STAGED_REPORTS).mkdir()
    (out / STAGED_REPORTS / "classification_report.json").write_text('{"accuracy": 0.1}')
    (out / STAGED_SUMMARY).write_text(json.dumps({"status": "complete", "bundle_sha256": "a bundle never swapped in"}))
    RunFolder(out).restore()
    assert json.loads((out / "summary.json").read_text())["status"] == "complete" and not (out / STAGED_SUMMARY).exists()
    assert json.loads((out / "classification_report.json").read_text())["accuracy"] == 0.9 and not (out / STAGED_REPORTS).exists()
