"""Backbones with real weights: where they come from, that they are the right ones, and the codes."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_sample_image

from tlpipe.data import Sample, eval_loader, eval_transform
from tlpipe.errors import TlpipeError
from tlpipe.models import CodeExtractor, create_backbone, extract_codes, offline_backbones, state_dict_sha256


@pytest.mark.parametrize("image, label", [("china.jpg", "palace"), ("flower.jpg", "daisy")])
def test_default_backbone_has_real_imagenet_weights(backbone, image, label):
    x = eval_transform(backbone.data_config)(Image.fromarray(load_sample_image(image))).unsqueeze(0)
    with torch.inference_mode():
        top = int(backbone.model(x).argmax())
    assert timm.data.ImageNetInfo().index_to_description(top) == label


def test_default_backbone_comes_from_the_offline_package_with_its_own_preprocessing(backbone):
    assert backbone.weights.kind == "package"
    assert backbone.weights.sha256 == state_dict_sha256(backbone.model)
    assert backbone.data_config["mean"] == (0.5, 0.5, 0.5)  # tf_efficientnet_lite0's pretrained cfg
    assert backbone.data_config["input_size"] == (3, 224, 224)
    assert backbone.data_config["interpolation"] == "bicubic"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_loads_the_same_weights(backbone, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = create_backbone("efficientnet_lite0", weights=path)
    assert loaded.weights.kind == "file"
    assert loaded.weights.sha256 == backbone.weights.sha256


def test_weights_of_the_wrong_shape_are_refused_with_the_entry_named(backbone, tmp_path):
    state = {k: v.contiguous() for k, v in backbone.model.state_dict().items()}
    state["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TlpipeError, match="conv_stem.weight") as err:
        create_backbone("efficientnet_lite0", weights=tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)


class NotATensor:
    pass


def test_pickled_objects_in_a_torch_file_are_never_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"conv_stem.weight": NotATensor()}, path)
    with pytest.raises(TlpipeError, match="cannot read weights"):
        create_backbone("efficientnet_lite0", weights=path)


def test_random_init_only_when_asked_and_recorded(backbone):
    random = create_backbone("efficientnet_lite0", weights="none")
    assert random.weights.kind == "none"
    assert random.weights.sha256 != backbone.weights.sha256


def test_unknown_backbone_name_suggests_how_to_find_one():
    with pytest.raises(TlpipeError, match="tlpipe models"):
        create_backbone("no_such_net_v9")


def test_offline_listing_includes_the_default():
    names = {row["name"] for row in offline_backbones()}
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= names


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_packages_load_with_every_shape_checked(name):
    loaded = create_backbone(name)
    assert loaded.weights.kind == "package" and loaded.arch == f"tf_{name}"


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    from conftest import class_color, make_image

    root = tmp_path_factory.mktemp("imgs")
    return [Sample(make_image(root / f"{i}.jpg", class_color(i % 3), size=(64, 48), noise=20, seed=i), i % 3) for i in range(6)]


def test_penultimate_codes_are_non_negative_and_deterministic(backbone, few_images):
    loader = eval_loader(few_images, backbone.data_config, batch_size=4, workers=0)
    first, labels = extract_codes(CodeExtractor(backbone.model), loader, torch.device("cpu"))
    second, _ = extract_codes(CodeExtractor(backbone.model), loader, torch.device("cpu"))
    assert first.shape == (6, 1280) and first.dtype == np.float32
    assert (first >= 0).all()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(labels, [s.label for s in few_images])


def test_a_pass_placed_by_rows_and_stopped_at_its_deadline_returns_the_rows_it_reached_in_order(backbone, few_images):
    loader = eval_loader(few_images, backbone.data_config, batch_size=4, workers=0)
    whole, labels = extract_codes(CodeExtractor(backbone.model), loader, torch.device("cpu"))
    rows = np.array([5, 0, 3, 1, 4, 2])  # where each image of the loader goes
    placed, placed_labels = extract_codes(CodeExtractor(backbone.model), loader, torch.device("cpu"), rows=rows)
    np.testing.assert_allclose(placed[rows], whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(placed_labels[rows], labels)
    cut, cut_labels = extract_codes(CodeExtractor(backbone.model), loader, torch.device("cpu"), rows=rows, deadline=0.0)
    assert cut.shape == (4, 1280)  # the first batch, then the deadline: rows 5, 0, 3, 1, in ascending order
    np.testing.assert_allclose(cut, placed[[0, 1, 3, 5]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cut_labels, placed_labels[[0, 1, 3, 5]])
    floor, _ = extract_codes(CodeExtractor(backbone.model), loader, torch.device("cpu"), rows=rows, deadline=0.0, at_least=5)
    assert floor.shape == (6, 1280)  # the deadline waits for at_least images: the second batch, the last


@pytest.mark.parametrize("layer, expected", [(-2, ("blocks.4", 112)), ("blocks.2", ("blocks.2", 40)), ("1", ("blocks.1", 24))])
def test_earlier_layer_codes_are_pooled_and_relud(backbone, few_images, layer, expected):
    extractor = CodeExtractor(backbone.model, layer)
    loader = eval_loader(few_images, backbone.data_config, batch_size=6, workers=0)
    codes, _ = extract_codes(extractor, loader, torch.device("cpu"))
    assert (extractor.layer, codes.shape[1]) == expected
    assert (codes >= 0).all() and codes.max() > 0


def test_taps_joined_by_plus_give_their_codes_side_by_side(backbone, few_images):
    loader = eval_loader(few_images, backbone.data_config, batch_size=6, workers=0)
    joined = CodeExtractor(backbone.model, "penultimate + -2 + blocks.4")  # the repeated tap counts once
    assert joined.layer == "penultimate+blocks.4"
    codes, _ = extract_codes(joined, loader, torch.device("cpu"))
    last, _ = extract_codes(CodeExtractor(backbone.model), loader, torch.device("cpu"))
    stage, _ = extract_codes(CodeExtractor(backbone.model, "blocks.4"), loader, torch.device("cpu"))
    np.testing.assert_allclose(codes, np.hstack([last, stage]), rtol=1e-5, atol=1e-6)


def test_a_closed_extractor_leaves_nothing_on_the_shared_backbone(backbone):
    """A hook left on the backbone would run in every later pass and keep its extractor (and the
    feature map it last captured) alive: one after the other, the first is gone once closed."""
    import gc
    import weakref

    images = torch.randn(2, 3, 64, 64)
    with CodeExtractor(backbone.model, "blocks.4") as first, torch.no_grad():
        expected = first(images)
    first_ref = weakref.ref(first)
    del first
    gc.collect()
    assert first_ref() is None
    with CodeExtractor(backbone.model, "blocks.4") as second, torch.no_grad():
        torch.testing.assert_close(second(images), expected)


def test_a_backbone_at_another_size_is_a_new_one_sharing_the_weights(backbone):
    sized = backbone.at_size(96)
    assert sized.data_config == {**backbone.data_config, "input_size": (3, 96, 96)} and sized.model is backbone.model
    assert backbone.data_config["input_size"] == (3, 224, 224)


def test_unknown_layer_lists_the_valid_ones(backbone):
    with pytest.raises(TlpipeError, match="blocks.4"):
        CodeExtractor(backbone.model, "blocks.99")


def test_unreachable_weights_say_what_was_tried_and_never_fall_back_to_random(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty caches, and no hub, on any machine
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TlpipeError, match=r"tried: hub cache \(empty\); hub timm/resnet18") as err:
        create_backbone("resnet18")
    assert "--weights none" in str(err.value) and "\n" not in str(err.value)


def test_flip_averaged_codes_are_the_mean_of_both_views_and_of_their_logits(backbone):
    images = torch.randn(3, 3, 64, 64)
    plain, flipped = CodeExtractor(backbone.model), CodeExtractor(backbone.model, hflip=True)
    with torch.no_grad():
        mean = (plain(images) + plain(images.flip(-1))) / 2
        assert torch.allclose(flipped(images), mean, atol=1e-5)
        weight, bias = torch.randn(4, mean.shape[1]), torch.randn(4)  # a linear head averages the views' logits
        both = ((plain(images) @ weight.T + bias) + (plain(images.flip(-1)) @ weight.T + bias)) / 2
        assert torch.allclose(flipped(images) @ weight.T + bias, both, atol=1e-4)


def test_a_large_cpu_pass_runs_in_onnx_runtime_and_gives_pytorchs_codes(backbone, few_images, monkeypatch):
    from tlpipe.models import features
    from tlpipe.models.runtime import onnx_pass

    extractor = CodeExtractor(backbone.model, "penultimate+blocks.4", hflip=True)
    loader = eval_loader(few_images, backbone.data_config, batch_size=4, workers=0)
    in_pytorch, labels = extract_codes(extractor, loader, torch.device("cpu"))  # 6 images: too few to export
    monkeypatch.setattr(features, "ORT_MIN_IMAGES", 1)
    in_onnx_runtime, same_labels = extract_codes(extractor, loader, torch.device("cpu"))
    np.testing.assert_allclose(in_onnx_runtime, in_pytorch, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, same_labels)
    images = next(iter(eval_loader(few_images, backbone.data_config, batch_size=6, workers=0)))[0]
    with torch.inference_mode():
        run = onnx_pass(extractor, images)
        assert run is not None  # exported, so the pass above did run in ONNX Runtime
        np.testing.assert_allclose(run(images[:5]).numpy(), extractor(images[:5]).numpy(), rtol=1e-4, atol=1e-5)


class _ThroughNumpy(torch.nn.Module):
    """A forward the exporter records as a constant: its output would not follow the input."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(images.numpy().mean(axis=(2, 3)))


def test_a_module_onnx_runtime_cannot_reproduce_stays_in_pytorch(backbone, few_images, monkeypatch):
    from tlpipe.models import features
    from tlpipe.models.runtime import onnx_pass

    monkeypatch.setattr(features, "ORT_MIN_IMAGES", 1)
    loader = eval_loader(few_images, backbone.data_config, batch_size=3, workers=0)
    images = next(iter(loader))[0]
    with torch.inference_mode():
        assert onnx_pass(_ThroughNumpy(), images) is None
    codes, _ = extract_codes(_ThroughNumpy(), loader, torch.device("cpu"))
    expected = np.concatenate([x.numpy().mean(axis=(2, 3)) for x, _ in loader])
    np.testing.assert_allclose(codes, expected, atol=1e-3)  # float32 means summed in another memory order
