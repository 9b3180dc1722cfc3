"""How much memory a training batch takes, and the largest batch that fits the device.

The accounting of the seed notes' *Computational Considerations*: parameters, their gradients and
the optimizer's state (AdamW: two values per trainable parameter), plus activations and their
gradients, which grow with the batch. Activations are measured by one probe step, never guessed:
on CUDA as the peak allocated during a forward and backward pass, elsewhere as the bytes of every
layer output kept for the backward pass (times two, for their gradients).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from tlpipe.models.hooks import Hooks


@dataclass(frozen=True)
class MemoryEstimate:
    fixed_bytes: int  # parameters + gradients + optimizer state: independent of the batch
    per_image_bytes: int  # activations and their gradients, per image

    def for_batch(self, batch_size: int) -> int:
        return self.fixed_bytes + batch_size * self.per_image_bytes

    def largest_batch(self, available_bytes: int, cap: int, headroom: float = 0.8) -> int:
        """Largest batch (at least 1, at most ``cap``) using ``headroom`` of the available memory."""
        room = headroom * available_bytes - self.fixed_bytes
        return max(1, min(cap, int(room // max(self.per_image_bytes, 1))))


def _tensor_bytes(model: nn.Module, trainable_only: bool) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not trainable_only)


def estimate_memory(model: nn.Module, input_size: tuple[int, int, int], device: torch.device, probe_batch: int = 2) -> MemoryEstimate:
    """Probe one training step of ``probe_batch`` images on ``device`` and extrapolate per image."""
    trainable = _tensor_bytes(model, trainable_only=True)
    fixed = _tensor_bytes(model, trainable_only=False) + trainable * (1 + 2)  # grads + AdamW's two moments
    images = torch.randn(probe_batch, *input_size, device=device).to(memory_format=torch.channels_last)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # the probe must not move BN statistics
    was_training = model.training
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        model(images).float().sum().backward()
        activations = torch.cuda.max_memory_allocated(device) - baseline
    else:
        kept: dict[int, int] = {}  # storage -> bytes: identities and in-place ops share their input's storage

        def keep(module, inputs, out):
            if isinstance(out, torch.Tensor):
                kept[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()

        with Hooks() as hooks:
            for module in model.modules():
                if not list(module.children()):
                    hooks.after(module, keep)
            model(images).float().sum().backward()
        activations = 2 * sum(kept.values())  # each kept output and its gradient
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return MemoryEstimate(fixed, int(activations // probe_batch))


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return _host_available()


def _host_available() -> int:
    """The host's available RAM: Linux's MemAvailable (free pages and the page cache it can drop; the
    free pages alone, SC_AVPHYS_PAGES, fall to little once the decoded-image cache was read), else
    the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
