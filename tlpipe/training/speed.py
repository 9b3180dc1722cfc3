"""How fast this device trains and evaluates a backbone: the figures a time plan is made from.

A few real training steps (forward, backward, AdamW) on a copy of the model, frozen as the
strategy freezes it, at the planned resolution; the median of ``reps`` timings, so one slow
repetition (another job on a busy machine) does not flip the plan. The inputs are random: the
cost of a step does not depend on the pixels. Beside it, the loaders' own work per image
(``loader_seconds``): the augmentation of real images of the data at that resolution, timed in
this process, then spread over the loader's workers. On a CPU it shares the cores with the
training steps and adds to them; on a GPU the workers feed it in parallel.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from tlpipe.config import AugmentConfig
from tlpipe.data import Sample, eval_array_transform, train_transform
from tlpipe.data.decoded import decode_square
from tlpipe.data.loader import cached_resize, decode_size
from tlpipe.training.finetune import Precision
from tlpipe.training.layers import freeze_stages
from tlpipe.utils import cpu_cores


def _timed(step, reps: int) -> float:
    step()  # warm-up: kernels chosen, memory allocated
    timings = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def measure_speed(model: nn.Module, size: int, device: torch.device, unfreeze_stages: int | None,
                  batch: int = 16, reps: int = 3) -> dict[str, float]:
    """Images per second of training steps and of evaluation at ``size`` px, ``batch`` images a step."""
    model = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    freeze_stages(model, unfreeze_stages)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    precision = Precision(device)
    images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = model(images).float().logsumexp(1).mean()
        loss.backward()
        optimizer.step()
        _sync(device)

    @torch.no_grad()
    def eval_step():
        model.eval()
        with precision.autocast():
            model(images)
        _sync(device)

    train, evaluate = _timed(train_step, reps), _timed(eval_step, reps)
    return {"size": size, "batch": batch, "reps": reps,
            "train_images_per_second": round(batch / train, 2), "eval_images_per_second": round(batch / evaluate, 2)}


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels: CUDA and MPS run asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def loader_seconds(samples: list[Sample], data_config: dict, augment: AugmentConfig, device: torch.device,
                   workers: int, images: int = 32) -> dict[str, float]:
    """Wall seconds per image the train and val loaders add to a step at ``data_config``'s size:
    their transforms (train: the recipe's augmentation; val: crop and normalize) timed on ``images``
    of ``samples`` decoded as the cache holds them (decoding itself happens once, not per epoch),
    divided by the workers that run them at once (on a CPU, no more than its cores)."""
    picked = samples[:: max(1, len(samples) // images)][:images]
    size, crop = decode_size(data_config), max(data_config["input_size"][1:])
    arrays = [decode_square(sample.path, size, crop, **cached_resize(data_config)) for sample in picked]
    parallel = max(1, workers if device.type != "cpu" else min(workers, cpu_cores()))

    def per_image(transform) -> float:
        start = time.perf_counter()
        for array in arrays:
            transform(image=array)
        return (time.perf_counter() - start) / max(len(arrays), 1) / parallel

    return {"loader_train_seconds_per_image": per_image(train_transform(data_config, augment)),
            "loader_eval_seconds_per_image": per_image(eval_array_transform(data_config)),
            "loader_overlaps": device.type != "cpu", "loader_workers": workers}
