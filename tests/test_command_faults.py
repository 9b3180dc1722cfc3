"""The commands around ``fit`` as a hostile user drives them: nothing of the user's overwritten,
nothing computed then lost, no traceback. One small real fit (linear, no tuning) serves them all."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, class_color, dataset, make_image, one_line, tlpipe, tree_snapshot


@pytest.fixture
def fitted(bundle_dir):
    """(dataset, fit output) of the session's shared fit: tests copy it before changing it."""
    root, bundle = bundle_dir
    return root, bundle.parent


def test_a_fit_that_cannot_keep_its_time_limit_says_so(capsys):
    from tlpipe.budget import Budget
    from tlpipe.run.report import print_budget
    from tlpipe.strategy.plan import overrun

    timings = {"check_data": 0.5, "load_backbone": 1.5, "extract_codes": 9.0, "train": 0.5}
    over = overrun(Budget(1.0, started=time.monotonic() - 17), timings)
    assert over["overran"].startswith("the fit took 1") and "s, over its 1s limit" in over["overran"]
    assert "(here 11s)" in over["overran"] and "give --time-limit 1" in over["overran"]
    print_budget({"budget": {"limit_seconds": 1.0, "elapsed_seconds": 17.0, **over}})
    assert "Over the limit" in capsys.readouterr().out
    assert overrun(Budget(60.0, started=time.monotonic() - 59), timings) == {}  # kept: nothing to say


def test_export_replaces_no_file_it_was_not_told_to(fitted, tmp_path):
    _, out = fitted
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("four years of work")
    one_line(tlpipe("export", out / "model", "--out", thesis), "must end in .onnx")
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"an earlier model")
    one_line(tlpipe("export", out / "model", "--out", existing), f"{existing} exists", "--overwrite")
    (tmp_path / "other.onnx.json").write_text("{}")  # the sidecar an export would write beside it
    one_line(tlpipe("export", out / "model", "--out", tmp_path / "other.onnx"), "other.onnx.json exists")
    assert thesis.read_text() == "four years of work" and existing.read_bytes() == b"an earlier model"
    assert not (tmp_path / "thesis.txt.json").exists() and not (tmp_path / "other.onnx").exists()


def test_export_never_writes_into_a_bundle(fitted):
    _, out = fitted
    before = tree_snapshot(out / "model")
    one_line(tlpipe("export", out / "model", "--out", out / "model" / "head.safetensors"), "inside the model bundle")
    one_line(tlpipe("export", out / "model", "--out", out / "model" / "m.onnx", "--overwrite"), "inside the model bundle")
    assert tree_snapshot(out / "model") == before


def test_a_sigkilled_export_leaves_no_temporary_file_after_the_next_export(fitted, tmp_path):
    _, out = fitted
    target = tmp_path / "exports" / "m.onnx"
    command = [sys.executable, "-m", "tlpipe", "export", str(out / "model"), "--out", str(target)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(target.parent.glob(".m.onnx.*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(target.parent.glob(".m.onnx.*.tmp")), "the export ended before it could be killed"
    result = tlpipe("export", out / "model", "--out", target)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.onnx", "m.onnx.json"]


@pytest.mark.parametrize("command", [
    ["evaluate", "{bundle}", "{missing}", "--json-file", "{file}/metrics.json"],
    ["evaluate", "{bundle}", "{missing}", "--plots", "{file}/plots"],
    ["evaluate", "{bundle}", "{missing}", "--plots", "{file}"],
    ["extract", "{missing}", "--out", "{file}/codes.npz"],
    ["extract", "{missing}", "--out", "{tmp}/codes.csv"],
    ["inspect", "{missing}", "--json", "{file}/inspect.json"],
    ["evaluate", "{bundle}", "{missing}", "--json-file", "/proc/tlpipe-out/metrics.json"],  # unwritable, even for root
])
def test_every_output_path_is_checked_before_any_work(fitted, tmp_path, command):
    """The data named does not exist: a message about it, not the output path, would mean the work came first."""
    _, out = fitted
    (tmp_path / "afile").write_text("not a folder")
    names = {"bundle": out / "model", "missing": tmp_path / "no-such-data", "file": tmp_path / "afile", "tmp": tmp_path}
    result = tlpipe(*[part.format(**names) for part in command])
    one_line(result, command[-2])
    assert "no-such-data" not in result.stderr.replace(str(tmp_path / "afile"), "")


def test_no_command_writes_into_the_dataset(fitted, tmp_path):
    root, out = fitted
    one_line(tlpipe("evaluate", out / "model", root, "--plots", root / "plots"), "inside the dataset folder")
    one_line(tlpipe("extract", root, "--out", root / "codes.npz"), "inside the dataset folder")
    assert not (root / "plots").exists() and not (root / "codes.npz").exists()


def test_a_killed_writers_temporary_files_go_and_a_live_or_foreign_ones_stay(fitted, tmp_path):
    from tlpipe.run.folder import RunFolder
    from tlpipe.paths import sweep_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {"dead": f".model.onnx.{dead.pid}.k9x2a1b3.tmp", "live": f".model.onnx.{os.getpid()}.a1b2c3d4.tmp",
             "foreign": ".notes.txt.tmp"}
    for folder in (tmp_path / "user", tmp_path / "fit" / "export"):
        for name in names.values():
            make_image(folder / "x.png").rename(folder / name)
    sweep_temporaries(tmp_path / "user", of="model.onnx")  # what an export does in the folder of its --out
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == sorted([names["live"], names["foreign"]])
    RunFolder(tmp_path / "fit").sweep()  # what a fit does in its own output folder
    assert [p.name for p in (tmp_path / "fit" / "export").iterdir()] == [names["live"]]


def test_an_existing_metrics_file_is_replaced_only_when_asked(fitted, tmp_path):
    root, out = fitted
    metrics = tmp_path / "metrics.json"
    metrics.write_text("mine")
    one_line(tlpipe("evaluate", out / "model", root, "--json-file", metrics), "exists", "--overwrite")
    assert metrics.read_text() == "mine"
    assert tlpipe("evaluate", out / "model", root, "--json-file", metrics, "--overwrite").exit_code == 0
    assert json.loads(metrics.read_text())["n_images"] == 12  # the flat folder, all of it


def test_a_file_name_too_long_for_the_file_system_is_one_line(fitted, tmp_path):
    root, out = fitted
    long_name = tmp_path / ("x" * 300 + ".jpg")
    one_line(tlpipe("predict", out / "model", long_name), "too long")
    one_line(tlpipe("evaluate", out / "model", tmp_path / ("d" * 300)), "too long")
    one_line(tlpipe("report", tmp_path / ("o" * 300)), "too long")
    one_line(tlpipe("fit", tmp_path / ("d" * 300), "-o", tmp_path / "out"), "too long")
    one_line(tlpipe("inspect", tmp_path / ("d" * 300)), "too long")
    one_line(tlpipe("extract", root, "--out", tmp_path / ("c" * 300 + ".npz")), "255")
    one_line(tlpipe("export", out / "model", "--out", tmp_path / ("m" * 300 + ".onnx")), "255")


def test_report_refuses_another_tools_summary_in_one_line(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"accuracy": 0.9, "metrics": {}}))
    one_line(tlpipe("report", tmp_path), "not written by a tlpipe fit")


def _copy_of(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("cache", ".tlpipe.lock"))
    return copy


def test_report_of_a_fit_whose_dataset_moved_is_built_from_its_folder(fitted, tmp_path):
    _, out = fitted
    copy = _copy_of(out, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({**summary, "data": str(tmp_path / "moved-away")}))
    result = tlpipe("report", copy)
    assert result.exit_code == 0, result.output
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert "no longer at" in page and "Confusion matrix" in page


@pytest.mark.parametrize("file, lines", [
    ("label_issues.csv", ["file,given,suggested,quality", "cats/0.jpg,cats,dogs,0.1"]),  # no path column
    ("val_predictions.csv", ["path,true,predicted,p:cats", "cats/0.jpg,cats,dogs,zz"]),  # a probability not a number
    ("val_predictions.csv", ["path,true,predicted,probability", "cats/0.jpg,cats"]),  # a row cut short
])
def test_report_of_a_damaged_csv_says_so_in_one_line(fitted, tmp_path, file, lines):
    copy = _copy_of(fitted[1], tmp_path)
    (copy / file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    one_line(tlpipe("report", copy), f"{file} is damaged", "rerun the fit")


def test_report_says_why_a_bundle_shows_no_heatmaps(fitted, tmp_path):
    copy = _copy_of(fitted[1], tmp_path)
    with (copy / "val_predictions.csv").open("a", encoding="utf-8", newline="") as f:
        csv.writer(f).writerow(["cats/0.jpg", "cats", "dogs", "0.9"])  # a mistake to show
    (copy / "model" / "head.safetensors").unlink()
    assert tlpipe("report", copy).exit_code == 0
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert 'alt="cats/0.jpg"' in page and "No heatmaps: the model could not explain its predictions" in page


def test_report_and_export_never_read_an_image_outside_the_dataset(fitted, tmp_path):
    from tlpipe.bundle import load_bundle
    from tlpipe.bundle.export import check_set

    root, out = fitted
    copy = _copy_of(out, tmp_path)
    secret = make_image(tmp_path / "private" / "photo.png", class_color(3), size=(64, 64))
    rows = list(csv.reader((copy / "val_predictions.csv").open(encoding="utf-8")))
    rows += [[str(secret), "cats", "dogs", "0.999"], ["../../private/photo.png", "cats", "dogs", "0.998"]]
    with (copy / "val_predictions.csv").open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    assert tlpipe("report", copy).exit_code == 0
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert f'alt="{secret}"' not in page and 'alt="../../private/photo.png"' not in page
    assert str(secret) in page  # the row is listed, its picture not shown
    images = check_set(load_bundle(copy / "model", "cpu"), None).images
    assert images and all(path.resolve().is_relative_to(root.resolve()) for path in images)


def test_usage_lines_name_arguments_as_unix_tools_do():
    result = tlpipe("predict")
    assert result.exit_code == 2
    assert "predict [OPTIONS] BUNDLE PATHS...\n" in result.output and "{" not in result.output


def test_a_part_of_the_record_that_failed_is_a_warning_in_the_summary_the_report_and_the_run(tmp_path):
    """The MLflow model cannot be logged (a file stands where the store keeps models): the fit is whole,
    and says so in one place, printed and logged."""
    from mlflow.tracking import MlflowClient

    root = dataset(tmp_path / "pets", ["cats", "dogs"])
    store = tmp_path / "store"
    (store / "mlartifacts" / "pets").mkdir(parents=True)
    (store / "mlartifacts" / "pets" / "models").write_text("in the way")
    uri, out = f"sqlite:///{store / 'mlflow.db'}", tmp_path / "out"
    result = tlpipe("fit", root, "-o", out, *FAST, "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    [warning] = summary["warnings"]
    assert warning.startswith("the MLflow model was not logged") and "mlflow_model" not in summary
    assert "Warning the MLflow model was not logged" in " ".join(result.stdout.split())
    assert MlflowClient(uri).get_run(summary["run_id"]).data.tags["tlpipe_warnings"] == warning
    assert "Warning: the MLflow model was not logged" in (out / "report.html").read_text(encoding="utf-8")


def test_a_fits_files_have_the_modes_the_users_umask_gives(bundle_dir):
    """Outputs are written atomically through a temporary file, yet readable as any file the user
    makes (mkstemp's 0600 would hide a shared run folder from the team)."""
    umask = os.umask(0o022)
    os.umask(umask)
    files = [p for p in bundle_dir[1].parent.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


def test_a_fit_that_failed_before_any_result_leaves_no_output_folder(tmp_path):
    root, out = dataset(tmp_path / "data", ["cats", "dogs"], per_class=1), tmp_path / "out"
    one_line(tlpipe("fit", root, "-o", out, *FAST), "class 'cats' has only 1 valid image")
    assert not out.exists()  # not a lock and an empty quarantine list
