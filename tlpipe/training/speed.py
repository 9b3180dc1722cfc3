"""How fast this device trains and evaluates a backbone: the figures a time plan is made from.

A few real training steps (forward, backward, AdamW) on a copy of the model, frozen as the
strategy freezes it, at the planned resolution; the median of ``reps`` timings, so one slow
repetition (another job on a busy machine) does not flip the plan. The inputs are random: the
cost of a step does not depend on the pixels.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from tlpipe.training.finetune import Precision, freeze_stages


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
