"""Where tensors run: CUDA when present, then Apple's MPS, else the CPU."""
from __future__ import annotations

import torch

from tlpipe.errors import TlpipeError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TlpipeError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TlpipeError(f"device '{name}' asked for, but no CUDA GPU is visible: use --device auto or cpu")
    return device
