"""Transfer signals: one hooked forward pass (shapes, codes identical to the pipeline's, BatchNorm
moments) and the scores computed from it (probe, LogME, BatchNorm gap), on small generated images."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import class_color, make_image
from scipy.optimize import minimize
from scipy.stats import multivariate_normal
from sklearn.datasets import load_sample_images

from tlpipe.config import load_config
from tlpipe.data import Sample, eval_loader
from tlpipe.errors import TlpipeError
from tlpipe.models import PENULTIMATE, Backbone, CodeExtractor, extract_codes, feature_layers
from tlpipe.strategy import FeatureSet, collect_features, compute_signals, logme
from tlpipe.strategy import frozen_pass as signals_module
from tlpipe.data import stratified_subset
from tlpipe.strategy.frozen_pass import batchnorm_stages

CONFIG = load_config("default", batch_size=8, num_workers=0, device="cpu")


@pytest.fixture(scope="module")
def small(backbone) -> Backbone:
    """The session backbone (same model) at 96 px: the same code paths, a fifth of the CPU time."""
    return replace(backbone, data_config={**backbone.data_config, "input_size": (3, 96, 96)})


@pytest.fixture(scope="module")
def colour_samples(tmp_path_factory) -> list[Sample]:
    """Three classes of noisy solid colours, 5 images each: separable for any ImageNet network."""
    root = tmp_path_factory.mktemp("colours")
    return [
        Sample(make_image(root / f"{c}_{k}.jpg", class_color(c), noise=12, seed=[c, k]), c)
        for c in range(3) for k in range(5)
    ]


@pytest.fixture(scope="module")
def colour_features(small, colour_samples) -> FeatureSet:
    return collect_features(small, colour_samples, CONFIG)


def test_one_pass_gives_every_stage_the_head_and_the_batchnorm_moments(backbone, colour_features):
    model, fs = backbone.model, colour_features
    stages = feature_layers(model)
    assert fs.codes.shape == (15, model.num_features) and fs.codes.dtype == np.float32
    assert list(fs.stages) == stages
    assert [x.shape for x in fs.stages.values()] == [(15, info["num_chs"]) for info in model.feature_info]
    assert fs.imagenet_confidence.shape == (15, 2)  # the ImageNet head's top probability and entropy
    top, entropy = fs.imagenet_confidence.T
    assert ((top > 1e-3) & (top <= 1)).all() and ((entropy >= 0) & (entropy <= np.log(1000))).all()
    assert fs.labels.tolist() == [c for c in range(3) for _ in range(5)] and fs.indices.tolist() == list(range(15))
    assert list(fs.bn_stats) == [*stages, PENULTIMATE]
    layers = [layer for layers in fs.bn_stats.values() for layer in layers]
    assert len(layers) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(layer.mean.shape == layer.var.shape == layer.running_var.shape for layer in layers)


def test_codes_are_exactly_what_the_pipeline_extracts(small, colour_samples, colour_features):
    few = colour_samples[::5]  # one image per class: fewer passes
    loader = eval_loader(few, small.data_config, batch_size=8, workers=0)
    codes, labels = extract_codes(CodeExtractor(small.model, PENULTIMATE), loader, torch.device("cpu"))
    np.testing.assert_allclose(colour_features.codes[::5], codes, rtol=1e-5, atol=1e-6)
    assert colour_features.labels[::5].tolist() == labels.tolist()
    stage = feature_layers(small.model)[2]
    pooled, _ = extract_codes(CodeExtractor(small.model, stage), loader, torch.device("cpu"))
    np.testing.assert_allclose(colour_features.stages[stage][::5], pooled, rtol=1e-5, atol=1e-6)


def test_batchnorm_moments_are_over_every_pixel_of_the_images(small, colour_samples, colour_features):
    loader = eval_loader(colour_samples, small.data_config, batch_size=15, workers=0)
    images = torch.cat([x for x, _ in loader])
    with torch.inference_mode():  # the stem BatchNorm's input is the stem convolution's output
        stem = small.model.conv_stem(images.to(memory_format=torch.channels_last)).double()
    first = colour_features.bn_stats[feature_layers(small.model)[0]][0]
    assert first.layer == "bn1"
    np.testing.assert_allclose(first.mean, stem.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first.var, stem.var((0, 2, 3), unbiased=False).numpy(), rtol=1e-3, atol=1e-6)


def test_batchnorm_moments_come_from_a_stratified_sample_and_rows_keep_their_order(
        small, colour_samples, colour_features, monkeypatch):
    monkeypatch.setattr(signals_module, "BATCHNORM_IMAGES", 6)
    sampled = collect_features(small, colour_samples, CONFIG)
    np.testing.assert_allclose(sampled.codes, colour_features.codes, rtol=1e-5, atol=1e-6)  # rows in the given order
    assert sampled.labels.tolist() == colour_features.labels.tolist()
    rows = stratified_subset(colour_features.labels, 6, CONFIG.seed)
    assert np.bincount(colour_features.labels[rows]).tolist() == [2, 2, 2]
    loader = eval_loader([colour_samples[i] for i in rows], small.data_config, batch_size=6, workers=0)
    images = torch.cat([x for x, _ in loader])
    with torch.inference_mode():
        stem = small.model.conv_stem(images.to(memory_format=torch.channels_last)).double()
    first = sampled.bn_stats[feature_layers(small.model)[0]][0]
    np.testing.assert_allclose(first.mean, stem.mean((0, 2, 3)).numpy(), rtol=1e-4, atol=1e-6)


def test_a_pass_in_onnx_runtime_keeps_pytorch_for_the_batchnorm_sample_and_gives_the_same_features(
        small, colour_samples, colour_features, monkeypatch):
    from tlpipe.models import features

    monkeypatch.setattr(features, "ORT_MIN_IMAGES", 1)  # 15 images: ONNX Runtime after the first 8 (one batch)
    monkeypatch.setattr(signals_module, "BATCHNORM_IMAGES", 6)
    with_onnx = collect_features(small, colour_samples, CONFIG)
    monkeypatch.setattr(features, "ORT_MIN_IMAGES", 10**9)
    in_pytorch = collect_features(small, colour_samples, CONFIG)
    np.testing.assert_allclose(with_onnx.codes, in_pytorch.codes, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(with_onnx.imagenet_confidence, in_pytorch.imagenet_confidence, rtol=1e-4, atol=1e-4)
    for stage in in_pytorch.stages:
        np.testing.assert_allclose(with_onnx.stages[stage], in_pytorch.stages[stage], rtol=1e-4, atol=1e-5)
    for level, layers in in_pytorch.bn_stats.items():  # the moments' hooks ran in PyTorch, on the same images
        for ours, theirs in zip(with_onnx.bn_stats[level], layers, strict=True):
            np.testing.assert_array_equal(ours.mean, theirs.mean)
            np.testing.assert_array_equal(ours.var, theirs.var)
    assert in_pytorch.pytorch_seconds_per_image == pytest.approx(in_pytorch.seconds / 15)
    assert 0 < with_onnx.pytorch_seconds_per_image  # timed on its first batch, the one PyTorch ran


def test_the_fine_tune_estimate_counts_pytorchs_speed_not_onnx_runtimes(colour_features):
    from dataclasses import replace as changed

    from tlpipe.strategy.auto import forward_seconds_per_image

    train = changed(colour_features, seconds=3.0, pytorch_seconds_per_image=0.5)  # 15 images: 0.2 s each overall
    val = changed(colour_features, seconds=1.5, pytorch_seconds_per_image=None)  # all in ONNX Runtime
    assert forward_seconds_per_image({"train": train, "val": val}) == pytest.approx(0.5)
    all_pytorch = changed(colour_features, seconds=1.5, pytorch_seconds_per_image=None)
    assert forward_seconds_per_image({"train": all_pytorch}) == pytest.approx(0.1)  # an old cache's set: its whole pass


def test_batchnorm_layers_belong_to_the_stage_that_runs_them(backbone):
    owner = batchnorm_stages(backbone.model, feature_layers(backbone.model))
    assert owner["bn1"] == "blocks.0"  # the stem
    assert owner["blocks.3.0.bn1"] == owner["blocks.4.2.bn3"] == "blocks.4"
    assert owner["blocks.6.0.bn3"] == "blocks.6"
    assert owner["bn2"] == PENULTIMATE  # after the last stage: conv_head's


def test_separable_classes_score_high_and_the_report_is_json(colour_features):
    signals = compute_signals(colour_features)
    assert signals.folds == 5
    assert signals.penultimate["probe_accuracy"] >= 0.9 and signals.penultimate["knn_accuracy"] >= 0.9
    assert signals.best_stage in colour_features.stages
    assert max(s["probe_accuracy"] for s in signals.stages) >= 0.9
    assert 0 < signals.imagenet_confidence["mean_max_prob"] <= 1
    assert 0 <= signals.imagenet_confidence["mean_entropy"] <= np.log(1000)
    assert signals.domain_gap > 0 and all(s["bn_gap"] > 0 for s in signals.stages)
    assert json.loads(json.dumps(signals.to_dict()))["best_stage"] == signals.best_stage


def _natural_and_flat(root) -> tuple[list[Sample], list[Sample]]:
    natural, flat = [], []
    for i, photo in enumerate(load_sample_images().images):  # two 427 x 640 photos, 2 crops each
        for k in range(2):
            y, x = 100, 60 + 250 * k
            crop = photo[y:y + 200, x:x + 220]
            path = root / f"natural_{i}_{k}.jpg"
            Image.fromarray(crop).save(path)
            natural.append(Sample(path, i))
            flat.append(Sample(make_image(root / f"flat_{i}_{k}.png", class_color(2 * i + k), size=(64, 64)), i))
    return natural, flat


def test_flat_images_are_further_from_imagenet_than_photos(small, tmp_path):
    natural, flat = (compute_signals(collect_features(small, s, CONFIG)) for s in _natural_and_flat(tmp_path))
    assert flat.domain_gap > 2 * natural.domain_gap  # measured: 1.00 against 0.09
    assert flat.stages[-1]["bn_gap"] > natural.stages[-1]["bn_gap"]


def test_logme_ranks_informative_features_above_random_ones():
    rng = np.random.default_rng(0)
    for n, d in [(120, 32), (60, 200)]:  # more samples than features, and fewer (rank-deficient)
        y = np.arange(n) % 3
        informative = rng.normal(size=(n, d)) + 1.5 * rng.normal(size=(3, d))[y]
        noise = rng.normal(size=(n, d))
        assert logme(informative, y) > logme(noise, y) + 0.1
        # evidence maximisation absorbs a global scale of the features (alpha rescales)
        assert logme(100 * informative, y) == pytest.approx(logme(informative, y), rel=1e-6)


def _max_log_evidence(f: np.ndarray, t: np.ndarray) -> float:
    """max over alpha, beta of log N(t; 0, F F'/alpha + I/beta) / N, by brute force."""
    def nll(log_alpha_beta: np.ndarray) -> float:
        alpha, beta = np.exp(log_alpha_beta)
        return -multivariate_normal.logpdf(t, cov=f @ f.T / alpha + np.eye(len(t)) / beta)

    return -minimize(nll, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-10}).fun / len(t)


def test_logme_is_the_maximised_evidence_of_bayesian_linear_regression():
    rng = np.random.default_rng(1)
    y = np.arange(60) % 3
    f = np.abs(rng.normal(size=(60, 20)) + rng.normal(size=(3, 20))[y])
    expected = np.mean([_max_log_evidence(f, (y == c).astype(float)) for c in range(3)])
    assert logme(f, y) == pytest.approx(expected, abs=1e-5)


def _hooks(model: torch.nn.Module) -> int:
    """Forward hooks and pre-hooks on ``model``'s modules. torch has no public way to list them: its
    own ``_forward_hooks`` dicts are the one place a leaked hook shows (it changes no output)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_max_images_keeps_class_proportions_and_no_hook_stays(small, colour_samples):
    labels = np.array([0] * 20 + [1] * 10)
    rows = stratified_subset(labels, 12, seed=0)
    assert len(rows) == 12 and np.bincount(labels[rows]).tolist() == [8, 4]
    assert rows.tolist() == sorted(rows) and stratified_subset(labels, None, 0).tolist() == list(range(30))
    before = _hooks(small.model)
    fs = collect_features(small, colour_samples, CONFIG, max_images=6)
    assert _hooks(small.model) == before
    assert np.bincount(fs.labels).tolist() == [2, 2, 2]
    assert fs.labels.tolist() == [colour_samples[i].label for i in fs.indices]


def test_a_class_with_one_image_is_refused():
    fs = FeatureSet(np.ones((3, 4), np.float32), {}, None, {}, np.array([0, 0, 1]), np.arange(3), 0.0)
    with pytest.raises(TlpipeError, match="at least 2 train images in every class.*--strategy linear"):
        compute_signals(fs)


def test_a_cached_pass_is_kept_chunk_by_chunk_and_a_killed_one_resumes_at_its_last_whole_chunk(small, colour_samples, tmp_path,
                                                                                                monkeypatch):
    from tlpipe.models import features

    monkeypatch.setattr(features, "CODES_CHUNK", 4)  # 15 images stand in for a pass of 100,000
    monkeypatch.setattr(signals_module, "BATCHNORM_IMAGES", 4)  # the moments within the first chunk, as at full size
    whole = collect_features(small, colour_samples, CONFIG)  # no cache: one pass
    calls = []
    real = signals_module.extract_codes
    monkeypatch.setattr(signals_module, "extract_codes", lambda *a, **k: calls.append(len(a[1].dataset)) or real(*a, **k))
    chunked = collect_features(small, colour_samples, CONFIG, cache=tmp_path)
    assert calls == [4, 4, 7]  # in the pass's order, each chunk written as the pass reached it (a short tail joins the last)
    np.testing.assert_array_equal(chunked.labels, whole.labels)
    np.testing.assert_array_equal(chunked.indices, whole.indices)
    np.testing.assert_allclose(chunked.codes, whole.codes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chunked.imagenet_confidence, whole.imagenet_confidence, rtol=1e-4, atol=1e-5)
    assert all(np.allclose(chunked.stages[k], whole.stages[k], rtol=1e-5, atol=1e-5) for k in whole.stages)
    moments = [[(b.layer, b.mean) for v in fs.bn_stats.values() for b in v] for fs in (chunked, whole)]
    assert [layer for layer, _ in moments[0]] == [layer for layer, _ in moments[1]]
    assert all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for (_, a), (_, b) in zip(*moments))
    entries = sorted((tmp_path / "signals").glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)
    assert len(entries) == 3

    entries[-1].unlink()  # killed before the last chunk was written
    calls.clear()
    resumed = collect_features(small, colour_samples, CONFIG, cache=tmp_path)
    assert calls == [7]  # only the chunk it lacked
    np.testing.assert_array_equal(resumed.codes, chunked.codes)
    assert resumed.seconds > 0 and [b.layer for v in resumed.bn_stats.values() for b in v] == \
        [b.layer for v in chunked.bn_stats.values() for b in v]


def test_a_pass_whose_deadline_is_past_before_it_starts_still_passes_one_batch(small, colour_samples, tmp_path):
    tagged = [Sample(s.path, tuple(int(c == s.label) for c in range(3))) for s in colour_samples]  # multi-label: no floor
    for samples in (colour_samples, tagged):
        fs = collect_features(small, samples, CONFIG, cache=tmp_path, deadline=0.0)
        assert len(fs.labels) == len(fs.indices) == fs.codes.shape[0] == CONFIG.batch_size
        assert fs.labels.tolist() == [samples[i].label if fs.labels.ndim == 1 else list(samples[i].label) for i in fs.indices]
    assert not list((tmp_path / "signals").glob("*.npz"))  # a part of a chunk is never kept


def test_a_second_pass_reads_the_cache_and_a_touched_file_misses_it(small, colour_samples, colour_features, tmp_path):
    calls = []
    first_stage = small.model.get_submodule(feature_layers(small.model)[0])
    handle = first_stage.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = collect_features(small, colour_samples, CONFIG, cache=tmp_path)
        assert len(calls) > 0 and len(list((tmp_path / "signals").glob("*.npz"))) == 1
        calls.clear()
        again = collect_features(small, colour_samples, CONFIG, cache=tmp_path)
        assert not calls  # no forward pass at all
        for field in ("codes", "labels", "indices", "imagenet_confidence"):
            np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
        assert again.stages.keys() == first.stages.keys()
        assert all(np.array_equal(again.stages[k], first.stages[k]) for k in first.stages)
        assert {k: [b.layer for b in v] for k, v in again.bn_stats.items()} == \
            {k: [b.layer for b in v] for k, v in first.bn_stats.items()}
        scores = [{k: v for k, v in compute_signals(f, seed=0).to_dict().items() if k != "seconds"} for f in (again, first)]
        assert scores[0] == scores[1]
        assert not list(tmp_path.rglob("*.tmp"))

        Image.open(colour_samples[0].path).save(colour_samples[0].path, quality=50)  # new bytes and mtime
        collect_features(small, colour_samples, CONFIG, cache=tmp_path)
        assert len(calls) > 0 and len(list((tmp_path / "signals").glob("*.npz"))) == 2
    finally:
        handle.remove()
