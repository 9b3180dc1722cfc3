"""A bundle and the commands that read it (evaluate, predict): any labelled subset is scored, and a
damaged or crafted bundle is one line that names the bundle's own files, never a --weights file.

One fit, on the user's own weights file (a .pt state dict), serves every test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import FAST, class_color, dataset, make_image, one_line, tlpipe

CLASSES = ["cats", "dogs", "owls"]
COLOUR = {name: class_color(i) for i, name in enumerate([*CLASSES, "yaks", "zebras"])}  # two the bundle lacks
CPU = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, backbone):
    import torch

    root = dataset(tmp_path_factory.mktemp("data") / "pets", CLASSES)
    weights = tmp_path_factory.mktemp("mine") / "mine.pt"
    torch.save(backbone.model.state_dict(), weights)
    out = tmp_path_factory.mktemp("fit") / "out"
    result = tlpipe("fit", root, "-o", out, "--weights", weights, *FAST)
    assert result.exit_code == 0, result.output
    return root, out / "model", weights


@pytest.fixture(scope="module")
def fine_tuned(fitted, tmp_path_factory):
    """The bundle saved again as a fine-tuned one is: its backbone's weights in backbone.safetensors."""
    from tlpipe.bundle import load_bundle, save_bundle

    loaded = load_bundle(fitted[1], "cpu")
    manifest = loaded.manifest
    return save_bundle(tmp_path_factory.mktemp("tuned") / "model", loaded.backbone, loaded.head, loaded.classes,
                       layer=manifest["codes"]["layer"], layer_relu=manifest["codes"]["relu"], config=manifest["config"],
                       metrics=manifest["metrics"], trained=True)


def labelled(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """``{split folder ("" for none): {class: images}}``; 0 images: an empty class folder."""
    for split, counts in layout.items():
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                make_image(root / split / name / f"{k}.jpg", COLOUR[name], size=(40, 32),
                           noise=20, seed=[k, 7])
    return root


SUBSETS = {  # layout, split scored, images scored
    "one class folder": ({"": {"dogs": 3}}, "all images", 3),
    "one class with one image": ({"": {"owls": 1}}, "all images", 1),
    "test/ alone": ({"test": {"cats": 2, "dogs": 2}}, "test", 4),
    "val/ alone with one class": ({"val": {"cats": 2}}, "val", 2),
    "an empty class folder beside one that is not": ({"": {"cats": 2, "dogs": 0}}, "all images", 2),
}


@pytest.mark.parametrize("case", SUBSETS)
def test_evaluate_scores_any_labelled_subset_of_the_bundle_classes(fitted, tmp_path, case):
    layout, split, n = SUBSETS[case]
    result = tlpipe("evaluate", fitted[1], labelled(tmp_path / "data", layout), "--json", *CPU)
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.stderr, result.stderr
    metrics = json.loads(result.stdout)
    assert (metrics["split"], metrics["n_images"]) == (split, n)
    assert list(metrics["per_class"]) == CLASSES  # a row for every class the bundle knows, absent ones too
    assert sum(row["support"] for row in metrics["per_class"].values()) == n
    assert 0 <= metrics["balanced_accuracy"] <= 1 and 0 <= metrics["ece"] <= 1 and "top_2_accuracy" in metrics


REFUSED = {
    "class folders the bundle does not know": (
        {"": {"cats": 1, "zebras": 1, "yaks": 1}},
        "has class folder(s) yaks, zebras that the bundle does not know; it knows: cats, dogs, owls"),
    "only empty class folders": ({"test": {"cats": 0, "dogs": 0}}, "no image files in the class folders of"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_evaluate_refuses_what_it_cannot_score_in_one_line(fitted, tmp_path, case):
    layout, message = REFUSED[case]
    data = labelled(tmp_path / "data", layout)
    one_line(tlpipe("evaluate", fitted[1], data, *CPU), message, str(data))


def test_a_test_split_whose_images_all_fail_is_named_not_swapped_for_val(fitted, tmp_path):
    data = labelled(tmp_path / "data", {"val": {"cats": 2}})
    (data / "test" / "cats").mkdir(parents=True)
    (data / "test" / "cats" / "broken.jpg").write_bytes(b"not a picture")
    one_line(tlpipe("evaluate", fitted[1], data, *CPU), "no image to score in test/")


def test_a_long_list_of_known_classes_is_cut_short():
    from tlpipe.bundle.evaluation import listed

    assert listed([f"c{i}" for i in range(30)]) == ", ".join(f"c{i}" for i in range(12)) + " and 18 more"


DAMAGE = {
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:5000]), "is damaged"),
    "random bytes": (lambda f: f.write_bytes(bytes(range(256)) * 8), "is damaged"),
    "missing": (lambda f: f.unlink(), "is missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_backbone_file_is_named_as_the_bundle_s_own(fitted, fine_tuned, tmp_path, case):
    copy = tmp_path / "model"
    shutil.copytree(fine_tuned, copy)
    damage, what = DAMAGE[case]
    damage(copy / "backbone.safetensors")
    result = tlpipe("predict", copy, fitted[0] / "cats" / "0.jpg", "--device", "cpu")
    one_line(result, f"{copy / 'backbone.safetensors'} {what}", "copy the whole bundle folder again, or refit")
    assert "--weights" not in result.stderr and "torch.save" not in result.stderr


def test_a_weights_file_is_carried_in_the_bundle_and_its_mlflow_model(fitted, tmp_path, mlflow_store):
    import mlflow

    root, bundle, weights = fitted
    backbone = json.loads((bundle / "bundle.json").read_text())["backbone"]
    assert backbone["embedded"] and backbone["weights"]["kind"] == "file"  # the config keeps the --weights given
    assert backbone["weights"]["location"] == "backbone.safetensors" and str(weights.parent) not in json.dumps(backbone)
    away = weights.rename(weights.with_suffix(".away"))  # the bundle alone must predict
    try:
        result = tlpipe("predict", bundle, root / "owls" / "0.jpg", "--format", "json", *CPU)
    finally:
        away.rename(weights)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["predictions"][0]["label"] == "owls"
    uri = json.loads((bundle.parent / "summary.json").read_text())["mlflow_model"]
    mlflow.set_tracking_uri(mlflow_store)
    logged = Path(mlflow.artifacts.download_artifacts(f"{uri}/artifacts/bundle", dst_path=str(tmp_path)))
    assert (logged / "backbone.safetensors").read_bytes() == (bundle / "backbone.safetensors").read_bytes()


def _outside(copy: Path, elsewhere: Path) -> str:
    """A weights location that leads out of the bundle through a link inside it."""
    (copy / "weights.safetensors").symlink_to(elsewhere)
    return "weights.safetensors"


POINTING_OUT = {
    "an absolute path": lambda copy, elsewhere: str(elsewhere),
    "a path up and out": lambda copy, elsewhere: f"../{elsewhere.name}",
    "a link inside that leads out": _outside,
}


@pytest.mark.parametrize("case", POINTING_OUT)
def test_a_bundle_json_naming_weights_outside_the_bundle_is_refused(fitted, fine_tuned, tmp_path, case):
    root, bundle, _ = fitted
    copy = tmp_path / "model"
    shutil.copytree(bundle, copy)
    elsewhere = shutil.copy(fine_tuned / "backbone.safetensors", tmp_path / "elsewhere.safetensors")  # the very weights
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["backbone"].update(embedded=False)
    manifest["backbone"]["weights"].update(kind="file", location=POINTING_OUT[case](copy, Path(elsewhere)))
    (copy / "bundle.json").write_text(json.dumps(manifest))
    result = tlpipe("predict", copy, root / "cats" / "0.jpg", "--device", "cpu")
    one_line(result, f"{copy / 'bundle.json'} names backbone weights outside the bundle folder", "refit")
