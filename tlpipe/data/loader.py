"""Torch datasets and loaders over checked samples, with the backbone's own eval preprocessing."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import timm.data
import torch
from torch.utils.data import DataLoader, Dataset

from tlpipe.budget import worker_options
from tlpipe.data.dataset import Sample
from tlpipe.data.images import load_rgb
from tlpipe.utils import default_workers


def eval_transform(data_config: dict) -> Callable:
    """Resize and centre-crop as the backbone's pretrained config says (timm's own eval transform)."""
    return timm.data.create_transform(**data_config, is_training=False)


def cached_resize(data_config: dict) -> dict:
    """How the decoded-image cache resizes, as timm's eval transform of ``data_config`` does: its
    interpolation, and whether it squashes (``crop_mode="squash"``) rather than keeps the aspect."""
    return {"interpolation": data_config.get("interpolation", "bicubic"), "squash": data_config.get("crop_mode") == "squash"}


def decode_size(data_config: dict) -> int:
    """Shorter side the eval resize goes to: JPEGs may be decoded down to it, never below."""
    size = max(data_config["input_size"][1:])
    return int(math.floor(size / data_config.get("crop_pct", 1.0)))


class ImageFiles(Dataset):
    """(image tensor, label) for each sample, decoded with the same code the check used."""

    def __init__(self, samples: Sequence[Sample], transform: Callable, min_size: int | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        return self.transform(load_rgb(sample.path, self.min_size)), sample.target


def eval_loader(samples: Sequence[Sample], data_config: dict, batch_size: int, workers: int | None = None) -> DataLoader:
    """Ordered, deterministic loader for extraction and prediction."""
    workers = default_workers(workers)
    dataset = ImageFiles(samples, eval_transform(data_config), decode_size(data_config))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        pin_memory=torch.cuda.is_available(),
        **worker_options(workers if len(dataset) > batch_size else 0),
    )
