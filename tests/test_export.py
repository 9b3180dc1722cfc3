"""The model leaving tlpipe: ONNX and TorchScript files checked against the bundle, the fit's
MLflow model loaded and served by a real ``mlflow models serve`` process, the README's ONNX
Runtime example run as it is written."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import class_color, free_port, make_image, mlflow_serve_answer, shared_dataset, tlpipe

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A quick fit of 3 generated classes, registered in the MLflow registry; its PNG val images."""
    root = tmp_path_factory.mktemp("data") / "colours"
    for c, name in enumerate(["red", "vert foncé", "blue"]):
        for k in range(10):
            make_image(root / name / f"{k}.png", class_color(c), size=(70, 50), noise=40, seed=[c, k])
    out = tmp_path_factory.mktemp("fit") / "out"
    result = tlpipe("fit", root, "-o", out, "--recipe", "quick", "--workers", "0", "--register", "colours")
    assert result.exit_code == 0, result.output
    return root, out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def odd_bundle(tmp_path_factory, backbone):
    """A bundle using everything the graph must carry: codes from two taps side by side, test-time
    flip averaging, a resolution other than the backbone's, embedded (fine-tuned) weights."""
    import dataclasses

    from tlpipe.bundle import load_bundle, save_bundle
    from tlpipe.training import LinearHead

    sized = dataclasses.replace(backbone, data_config={**backbone.data_config, "input_size": (3, 96, 96)})
    width = 1280 + 320  # penultimate + blocks.6's channels
    rng = np.random.default_rng(0)
    head = LinearHead(rng.normal(0, 0.05, (3, width)).astype(np.float32), np.zeros(3, np.float32), "finetune", 1.3)
    path = save_bundle(tmp_path_factory.mktemp("odd") / "model", sized, head, ["a", "b", "c"], layer="penultimate+blocks.6",
                       layer_relu=True, config={}, metrics={}, trained=True, hflip=True)
    images = tmp_path_factory.mktemp("check")
    for k in range(9):
        make_image(images / f"{k}.jpg", class_color(k % 3), size=(120, 90), noise=60, seed=k)
    return load_bundle(path, "cpu"), images


def test_onnx_export_agrees_with_the_bundle_and_carries_the_preprocessing(fitted):
    import onnxruntime as ort

    from tlpipe.bundle import load_bundle
    from tlpipe.bundle.graph import pixels

    root, out, summary = fitted
    result = tlpipe("export", out / "model")
    assert result.exit_code == 0, result.output
    path = out / "export" / "model.onnx"
    record = json.loads((out / "export" / "model.onnx.json").read_text())
    parity = record["parity"]
    assert parity["passed"] and parity["images_from"] == "validation" and parity["images"] == summary["splits"]["val"]
    for size in ("1", "2", "7"):
        assert parity["batches"][size]["top1_agreement"] == 1.0 and parity["batches"][size]["max_abs_difference"] <= 1e-4
        assert parity["batches"][size]["accuracy"] == pytest.approx(summary["val_accuracy"])
    assert record["opset"] >= 17 and record["exporter"] in ("dynamo", "torchscript")
    assert record["sha256"] and record["classes"] == summary["classes"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ["blue", "red", "vert foncé"] == summary["classes"]
    assert json.loads(meta["preprocessing"])["mean"] == record["preprocessing"]["mean"]
    bundle = load_bundle(out / "model", "cpu")
    images = sorted(root.rglob("*.png"))[:5]  # any batch size, here 5
    probabilities = session.run(None, {"images": pixels(bundle, images)})[0]
    np.testing.assert_allclose(probabilities, bundle.predict_proba(images, workers=0), atol=1e-5)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.metrics["export_onnx_batch7_top1_agreement"] == 1.0


def test_the_graph_holds_the_flip_the_taps_and_the_resolution_in_both_formats(odd_bundle, tmp_path):
    import onnxruntime as ort

    from tlpipe.bundle.export import export_bundle
    from tlpipe.bundle.graph import pixels

    bundle, images = odd_bundle
    exported = export_bundle(bundle, "onnx", tmp_path / "odd.onnx", input_type="float32", check=images)
    assert exported.record["parity"]["passed"] and exported.record["parity"]["images"] == 9
    assert exported.record["parity"]["bundle_accuracy"] is None  # a folder of unlabelled images
    assert exported.record["preprocessing"]["test_time_hflip"] and exported.record["preprocessing"]["crop"] == [96, 96]
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    floats = pixels(bundle, sorted(images.iterdir())[:3], "float32")
    assert floats.dtype == np.float32 and floats.max() <= 1.0
    assert session.run(None, {"images": floats})[0].shape == (3, 3)
    scripted = export_bundle(bundle, "torchscript", tmp_path / "odd.pt", check=images)
    assert scripted.record["parity"]["passed"] and scripted.record["exporter"] == "torch.jit.trace"


def test_torchscript_round_trip_loads_alone_with_its_metadata(fitted, tmp_path):
    import torch

    from tlpipe.bundle import load_bundle
    from tlpipe.bundle.graph import pixels

    root, out, summary = fitted
    target = tmp_path / "deploy" / "colours.pt"
    result = tlpipe("export", out / "model", "--format", "torchscript", "--out", target)
    assert result.exit_code == 0, result.output
    extra = {"tlpipe.json": ""}
    module = torch.jit.load(str(target), _extra_files=extra)
    assert json.loads(extra["tlpipe.json"])["classes"] == summary["classes"]
    bundle = load_bundle(out / "model", "cpu")
    images = sorted(root.rglob("*.png"))[:4]
    with torch.inference_mode():
        probabilities, unknown_scores = module(torch.from_numpy(pixels(bundle, images)))
    np.testing.assert_allclose(probabilities.numpy(), bundle.predict_proba(images, workers=0), atol=1e-5)
    codes = bundle.codes(images, workers=0)
    np.testing.assert_allclose(unknown_scores.numpy(), bundle.unknown_scores(codes)[0], rtol=1e-4)
    assert json.loads(target.with_name("colours.pt.json").read_text())["parity"]["passed"]


def test_a_tampered_onnx_file_is_refused_and_nothing_is_written(fitted, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    import tlpipe.bundle.export as export

    _, out, _ = fitted
    write = export.write_onnx

    def write_then_tamper(module, example, path, meta, dynamo):  # a damaged copy, or a wrong graph, from both exporters
        write(module, example, path, meta, dynamo)
        model = onnx.load(str(path))
        stem = next(t for t in model.graph.initializer if tuple(t.dims) == (32, 3, 3, 3))  # the first conv's weights
        stem.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(stem), stem.name))
        onnx.save(model, str(path))

    monkeypatch.setattr(export, "write_onnx", write_then_tamper)
    target = tmp_path / "bad.onnx"
    result = tlpipe("export", out / "model", "--out", target)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "export refused, nothing written" in result.stderr and "--force" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left
    folder = tlpipe("export", out / "model", "--out", tmp_path)
    assert folder.exit_code == 2 and "is a folder: give a file name" in folder.stderr and folder.stderr.count("\n") == 1
    forced = tlpipe("export", out / "model", "--out", target, "--force")
    assert forced.exit_code == 0 and target.is_file()
    assert json.loads(target.with_name("bad.onnx.json").read_text())["parity"]["forced"] is True


def test_a_failing_onnx_exporter_gives_way_to_the_other_and_says_so(fitted, tmp_path, monkeypatch):
    import tlpipe.bundle.export as export
    from tlpipe.bundle import load_bundle

    _, out, _ = fitted
    write = export.write_onnx

    def dynamo_breaks(module, example, path, meta, dynamo):
        if dynamo:
            raise RuntimeError("Conv shapes not supported\nmore detail")
        write(module, example, path, meta, dynamo)

    monkeypatch.setattr(export, "write_onnx", dynamo_breaks)
    exported = export.export_bundle(load_bundle(out / "model", "cpu"), "onnx", tmp_path / "m.onnx")
    assert exported.record["exporter"] == "torchscript" and exported.record["parity"]["passed"]
    assert exported.record["exporter_notes"] == ["the dynamo exporter failed: RuntimeError: Conv shapes not supported"]


def test_the_readme_onnx_runtime_example_runs_as_written(fitted, tmp_path):
    from tlpipe.bundle import load_bundle

    root, out, _ = fitted
    if not (out / "export" / "model.onnx").exists():
        assert tlpipe("export", out / "model").exit_code == 0
    block = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block, "README.md lost its ONNX Runtime example"
    assert len(block.group(1).strip().splitlines()) <= 15
    script = tmp_path / "example.py"
    script.write_text(block.group(1), encoding="utf-8")
    image = sorted((root / "vert foncé").iterdir())[0]
    shown = subprocess.run([sys.executable, str(script), str(out / "export" / "model.onnx"), str(image)],
                           capture_output=True, text=True, timeout=120, check=True).stdout.split()
    expected = load_bundle(out / "model", "cpu").predict([image], workers=0)[0]
    assert " ".join(shown[:-1]) == expected.labels[0]
    assert float(shown[-1]) == pytest.approx(expected.probabilities[0], abs=1e-4)


def test_the_fits_mlflow_model_predicts_like_the_bundle_from_bytes_and_base64(fitted, tmp_path):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from tlpipe.bundle import load_bundle

    root, out, summary = fitted
    mlflow.set_tracking_uri(summary["tracking_uri"])
    model = mlflow.pyfunc.load_model(summary["mlflow_model"])
    images = sorted(root.rglob("*.png"))[::7]
    expected = load_bundle(out / "model", "cpu").predict(images, top_k=2, workers=0)
    frame = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}), params={"top_k": 2})
    assert list(frame["label"]) == [e.labels[0] for e in expected]
    assert [list(labels) for labels in frame["top_k_labels"]] == [e.labels for e in expected]
    np.testing.assert_allclose(np.stack(frame["top_k_probabilities"]), [e.probabilities for e in expected], atol=1e-6)
    encoded = model.predict(pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}))
    assert list(encoded["label"]) == list(frame["label"])
    assert np.stack(encoded["probabilities"]).shape == (len(images), 3)
    with pytest.raises(MlflowException, match="row 1: not a readable image"):
        model.predict(pd.DataFrame({"image": [images[0].read_bytes(), b"not an image"]}))
    champion = mlflow.pyfunc.load_model("models:/colours@champion")  # --register colours
    assert champion.metadata.metadata["classes"] == summary["classes"]
    assert json.loads((out / "summary.json").read_text())["registered"] == {"name": "colours", "version": "1", "alias": "champion"}
    logged = mlflow.artifacts.download_artifacts(run_id=summary["run_id"], artifact_path="summary.json", dst_path=str(tmp_path))
    assert json.loads(Path(logged).read_text())["registered"]["version"] == "1"  # the run's copy says so too


def test_a_registry_name_or_alias_mlflow_refuses_is_one_line_before_any_training(tmp_path):
    for flags, why in ((["--register", "a/b"], "Names cannot contain '/'"), (["--register", "ok", "--alias", "latest"], "reserved")):
        result = tlpipe("fit", tmp_path / "never-read", "-o", tmp_path / "out", *flags)
        assert result.exit_code == 2 and why in result.stderr and result.stderr.count("\n") == 1, result.output
        assert not (tmp_path / "out").exists()


def test_mlflow_models_serve_answers_with_the_labels_tlpipe_predict_gives(fitted, tmp_path):
    root, out, summary = fitted
    images = [sorted((root / name).iterdir())[1] for name in ("red", "vert foncé")]
    predicted = tlpipe("predict", out / "model", *images, "--format", "json", "--workers", "0")
    expected = json.loads(predicted.stdout)
    answer = mlflow_serve_answer(summary, images, tmp_path / "serve.log")
    assert [row["label"] for row in answer] == [row["predictions"][0]["label"] for row in expected]
    np.testing.assert_allclose([row["probability"] for row in answer],
                               [row["predictions"][0]["probability"] for row in expected], atol=1e-5)


@pytest.mark.integration
def test_hymenoptera_bundle_exports_with_parity(tmp_path):
    data = shared_dataset("hymenoptera")
    out = tmp_path / "out"
    assert tlpipe("fit", data, "-o", out, "--strategy", "linear", "--recipe", "quick", "--workers", "0").exit_code == 0
    result = tlpipe("export", out / "model")
    assert result.exit_code == 0, result.output
    parity = json.loads((out / "export" / "model.onnx.json").read_text())["parity"]
    assert parity["passed"] and parity["images"] == 153
    assert all(row["top1_agreement"] == 1.0 and row["max_abs_difference"] <= 1e-4 for row in parity["batches"].values())


def test_tlpipe_serve_runs_a_registered_model_and_stops_with_tlpipe(fitted, mlflow_store):
    from conftest import health_status

    root, out, summary = fitted
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": summary["tracking_uri"]}
    serve = subprocess.Popen([sys.executable, "-m", "tlpipe", "serve", "models:/colours@champion", "--port", str(port)],
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert f"on http://127.0.0.1:{port}/invocations" in serve.stdout.readline()
        assert health_status(port, timeout=120) == 200
        image = sorted((root / "blue").iterdir())[0]
        body = json.dumps({"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}], "params": {"top_k": 1}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"})
        [row] = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
        assert row["top_k_labels"] == [row["label"]] and len(row["probabilities"]) == 3
        serve.send_signal(signal.SIGTERM)  # to tlpipe alone: its server goes with it
        assert serve.wait(timeout=30) == 0
        assert health_status(port, timeout=3) is None
    finally:
        serve.kill()
    wrong = tlpipe("serve", out / "model")  # the bundle folder, not the fit's output folder
    assert wrong.exit_code == 2 and "neither a fit's output folder" in wrong.stderr and wrong.stderr.count("\n") == 1
