"""Training augmentation over the decoded-image cache, reproducible per sample.

Each sample's distortion is drawn from a seed that depends only on (run seed, epoch, index):
``EpochSampler`` hands out ``(index, seed)`` keys from the main process and ``CachedImages``
reseeds the transform with that key's seed, so results do not depend on worker count, worker
order or persistent workers.
"""
from __future__ import annotations

import math
import mmap
import random
from pathlib import Path
from typing import Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import Dataset, Sampler

from tlpipe.config import AugmentConfig
from tlpipe.data.decoded import centre_offset
from tlpipe.data.loader import decode_size

_CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def _normalize(data_config: dict) -> list:
    """timm's ToTensor + Normalize: pixels scaled to 0..1, then the backbone's mean and std."""
    return [A.Normalize(mean=data_config["mean"], std=data_config["std"], max_pixel_value=255.0), ToTensorV2()]


def train_transform(data_config: dict, aug: AugmentConfig) -> A.Compose:
    """Random crop to the backbone's input, then the configured flips, affine and colour changes
    (each left out when its size or probability is 0). HWC uint8 in, CHW float32 tensor out. With
    augmentation off, the eval transform: deterministic, so a partial fine-tune's frozen stages
    run once on train too."""
    if aug.off:
        return eval_array_transform(data_config)
    height, width = data_config["input_size"][1:]
    interpolation = _CV2_INTERPOLATION.get(data_config.get("interpolation"), cv2.INTER_CUBIC)
    steps = [A.RandomResizedCrop(size=(height, width), scale=tuple(aug.crop_scale), interpolation=interpolation)]
    if aug.hflip > 0:
        steps.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        steps.append(A.VerticalFlip(p=aug.vflip))
    if aug.affine_p > 0 and (aug.rotate > 0 or aug.shear > 0):
        # Ranges, not numbers: Affine reads a bare number as a fixed angle.
        steps.append(A.Affine(
            rotate=(-aug.rotate, aug.rotate), shear=(-aug.shear, aug.shear),
            interpolation=interpolation, p=aug.affine_p,
        ))
    if aug.color_p > 0:
        if aug.rgb_shift > 0:
            limit = (-aug.rgb_shift, aug.rgb_shift)
            steps.append(A.RGBShift(r_shift_limit=limit, g_shift_limit=limit, b_shift_limit=limit, p=aug.color_p))
        if aug.color_jitter > 0:
            strength = aug.color_jitter
            steps.append(A.ColorJitter(
                brightness=strength, contrast=strength, saturation=strength, hue=strength / 10, p=aug.color_p,
            ))
        if aug.fancy_pca > 0:
            steps.append(A.FancyPCA(alpha=aug.fancy_pca, p=aug.color_p))
    return A.Compose(steps + _normalize(data_config))


def eval_array_transform(data_config: dict) -> A.Compose:
    """Centre crop + normalize for cached ``decode_size`` squares: timm's eval transform, minus the
    resize the cache already did. The crop uses torchvision's offset rounding (albumentations'
    CenterCrop floors, which is one pixel off for some sizes)."""
    size = decode_size(data_config)
    height, width = data_config["input_size"][1:]
    top, left = centre_offset(size - height), centre_offset(size - width)
    crop = A.Crop(x_min=left, y_min=top, x_max=left + width, y_max=top + height)
    return A.Compose([crop] + _normalize(data_config))


class CachedImages(Dataset):
    """(tensor, label) from an array of cached images. A key ``(index, seed)`` reseeds the
    transform for that one call, so the augmentation depends on nothing else."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: A.Compose):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self) -> dict:
        # Spawned DataLoader workers get the dataset pickled: send a memory-mapped cache by its
        # file name, not as a copy of every pixel.
        state = dict(self.__dict__)
        if isinstance(self.images, np.memmap) and isinstance(self.images.base, mmap.mmap):
            state["images"] = Path(self.images.filename)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["images"], Path):
            state["images"] = np.load(state["images"], mmap_mode="r")
        self.__dict__.update(state)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None:
            # One generator pair shared by all steps: Compose.set_random_seed would give every step
            # its own generator on the same seed, so e.g. both flips would always fire together.
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return self.transform(image=np.asarray(self.images[index]))["image"], self.labels[index]


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)``: a (seed, epoch)-seeded permutation when shuffling, and a
    per-sample seed drawn from (seed, epoch, index) alone. With ``num_replicas > 1``, this rank's
    share, padded by wrapping around as ``DistributedSampler`` does. Runs in the main process, so
    ``set_epoch`` reaches it even with persistent workers."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.num_replicas)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order_seq, seed_seq = np.random.SeedSequence([self.seed % 2**64, self.epoch]).spawn(2)
        if self.shuffle:
            generator = torch.Generator().manual_seed(int(order_seq.generate_state(1, np.uint64)[0]))
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        # One seed per index (not per position), so the order and the rank never change a sample's seed.
        sample_seeds = np.random.default_rng(seed_seq).integers(0, 2**32, size=self.n, dtype=np.uint32)
        total = len(self) * self.num_replicas
        while order and len(order) < total:
            order += order[: total - len(order)]
        for index in order[self.rank:total:self.num_replicas]:
            yield index, int(sample_seeds[index])
