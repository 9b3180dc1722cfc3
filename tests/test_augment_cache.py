"""The decoded-image cache and seeded augmentation: same pixels as timm's eval preprocessing,
safe reuse and rebuilds, and augmentations that depend only on (seed, epoch, index)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from conftest import make_image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from tlpipe.config import AugmentConfig
from tlpipe.data import Sample, load_rgb
from tlpipe.data.augment import CachedImages, EpochSampler, eval_array_transform, train_transform
from tlpipe.data.decoded import build_decoded_cache, cache_path
from tlpipe.data.loader import cached_resize, decode_size, eval_transform

ALL_OFF = AugmentConfig(
    hflip=0, vflip=0, rotate=0, shear=0, affine_p=0, rgb_shift=0, color_jitter=0, color_p=0, fancy_pca=0
)


def data_config(input_side: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic", crop_mode: str = "center") -> dict:
    return {
        "input_size": (3, input_side, input_side), "interpolation": interpolation, "crop_pct": crop_pct,
        "crop_mode": crop_mode, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
    }


def noisy_samples(folder, sizes) -> list[Sample]:
    return [
        Sample(make_image(folder / f"img_{i}.jpg", color=(90, 140, 200), size=size, noise=60, seed=i), i % 2)
        for i, size in enumerate(sizes)
    ]


def batches(loader) -> list[torch.Tensor]:
    return [images for images, _ in loader]


# 224/0.875 is the default backbone's; at 160 (the quick recipe) the two centre crops (cache, then
# input) only add up to timm's single one because the cache is told the input side.
@pytest.mark.parametrize("input_side, interpolation, crop_mode", [
    (224, "bicubic", "center"), (160, "bicubic", "center"),
    (224, "bilinear", "center"), (224, "bicubic", "squash"),  # as many timm weights' pretrained_cfg says
])
def test_cache_matches_timm_eval_preprocessing(tmp_path, input_side, interpolation, crop_mode):
    config = data_config(input_side, interpolation=interpolation, crop_mode=crop_mode)
    size = decode_size(config)
    samples = noisy_samples(tmp_path / "images", [(120, 80), (70, 130), (81, 57)])
    cache = build_decoded_cache(samples, size, tmp_path / "cache", workers=2, crop=input_side, **cached_resize(config))
    assert cache.shape == (3, size, size, 3) and cache.dtype == np.uint8
    to_tensor, timm_eval = eval_array_transform(config), eval_transform(config)
    for square, sample in zip(cache, samples):
        expected = timm_eval(load_rgb(sample.path, size))
        got = to_tensor(image=np.asarray(square))["image"]
        assert got.dtype == torch.float32 and got.shape == expected.shape == (3, input_side, input_side)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_cache_reused_until_a_file_changes(tmp_path):
    samples = noisy_samples(tmp_path / "images", [(60, 40), (40, 60)])
    first = build_decoded_cache(samples, 32, tmp_path / "cache")
    path = cache_path(samples, 32, tmp_path / "cache")
    built_at = path.stat().st_mtime_ns
    again = build_decoded_cache(samples, 32, tmp_path / "cache")
    assert isinstance(again, np.memmap) and os.path.samefile(again.filename, path)
    assert path.stat().st_mtime_ns == built_at
    np.testing.assert_array_equal(again, first)

    os.utime(samples[0].path, ns=(built_at, built_at + 10**9))  # touched: same bytes, new mtime
    assert cache_path(samples, 32, tmp_path / "cache") != path
    make_image(samples[1].path, color=(10, 10, 10), size=(60, 40))  # replaced by another picture
    rebuilt = build_decoded_cache(samples, 32, tmp_path / "cache")
    assert not np.array_equal(rebuilt[1], first[1])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_failed_build_leaves_no_cache_file(tmp_path):
    samples = noisy_samples(tmp_path / "images", [(40, 40)] * 6)
    samples[3].path.write_bytes(b"not a jpeg at all")
    with pytest.raises(OSError):
        build_decoded_cache(samples, 32, tmp_path / "cache", workers=2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_train_transform_builds_with_defaults_and_with_everything_off():
    config = {**data_config(), "input_size": (3, 48, 40)}
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for aug in (AugmentConfig(), ALL_OFF):
        out = train_transform(config, aug)(image=image)["image"]
        assert out.dtype == torch.float32 and out.shape == (3, 48, 40)
    names = [type(t).__name__ for t in train_transform(config, ALL_OFF)]
    assert names == ["RandomResizedCrop", "Normalize", "ToTensorV2"]


def test_augmentation_depends_only_on_index_and_seed():
    images = np.random.default_rng(1).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    dataset = CachedImages(images, [0, 1, 0, 1], train_transform(data_config(32), AugmentConfig()))
    first, label = dataset[(2, 7)]
    dataset[(1, 3)], dataset[(2, 8)]  # other calls in between change nothing
    again, _ = dataset[(2, 7)]
    assert label == 0 and torch.equal(first, again)
    assert not torch.equal(first, dataset[(2, 8)][0])


def test_flips_are_drawn_independently():
    """Compose.set_random_seed gives every step its own generator on the same seed, which would
    make both flips always fire together; CachedImages shares one generator instead."""
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    aug = ALL_OFF.model_copy(update={"crop_scale": [1.0, 1.0], "hflip": 0.5, "vflip": 0.5})
    dataset = CachedImages(image[None], [0], train_transform(data_config(32), aug))
    unflipped = eval_array_transform(data_config(32, crop_pct=1.0))(image=image)["image"]  # scale 1: whole square
    outcomes = {(h, v): torch.flip(unflipped, [d for d, flip in ((2, h), (1, v)) if flip])
                for h in (False, True) for v in (False, True)}
    seen = {flips for seed in range(40) for flips, ref in outcomes.items() if torch.equal(dataset[(0, seed)][0], ref)}
    assert seen == set(outcomes)


def test_loader_batches_depend_only_on_seed_and_epoch():
    images = np.random.default_rng(2).integers(0, 256, (24, 40, 40, 3), dtype=np.uint8)
    dataset = CachedImages(images, [i % 3 for i in range(24)], train_transform(data_config(32), AugmentConfig()))
    sampler = EpochSampler(len(dataset), seed=5)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler, num_workers=2, persistent_workers=True)
    sampler.set_epoch(1)
    epoch1 = batches(loader)
    sampler.set_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(epoch1, batches(loader), strict=True))
    sampler.set_epoch(2)
    assert not all(torch.equal(a, b) for a, b in zip(epoch1, batches(loader), strict=True))

    in_process = EpochSampler(len(dataset), seed=5)
    in_process.set_epoch(1)
    single = batches(DataLoader(dataset, batch_size=8, sampler=in_process, num_workers=0))
    assert all(torch.equal(a, b) for a, b in zip(epoch1, single, strict=True))


def test_epoch_sampler_shares_indices_between_ranks():
    whole = list(EpochSampler(11, seed=3))
    ranks = [list(EpochSampler(11, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [6, 6] == [len(EpochSampler(11, 3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert {i for r in ranks for i, _ in r} == set(range(11))
    seed_of = dict(whole)  # a sample's seed does not depend on the rank it lands on
    assert all(seed_of[i] == s for r in ranks for i, s in r)
    assert all(0 <= s < 2**32 for _, s in whole)
    assert [i for i, _ in EpochSampler(5, seed=3, shuffle=False)] == list(range(5))


def test_memory_mapped_cache_pickles_by_file_name(tmp_path):
    """Spawned workers get the dataset pickled: a cache on disk must travel as its file name."""
    samples = noisy_samples(tmp_path / "images", [(50, 40)] * 3)
    cache = build_decoded_cache(samples, 64, tmp_path / "cache")
    labels, transform = [s.label for s in samples], eval_array_transform(data_config(64, 1.0))
    payload = pickle.dumps(CachedImages(cache, labels, transform))
    copied = pickle.dumps(CachedImages(np.array(cache), labels, transform))
    assert len(copied) - len(payload) > 0.9 * cache.nbytes
    expected = transform(image=np.array(cache[1]))["image"]
    torch.testing.assert_close(pickle.loads(payload)[1][0], expected, rtol=0, atol=0)
