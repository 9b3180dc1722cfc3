"""Where tensors run: CUDA when present, then Apple's MPS, else the CPU."""
from __future__ import annotations

import torch

from tlpipe.config import device_name
from tlpipe.errors import TlpipeError


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device ``name`` names (``config.DEVICE_FORMS``); one line when it cannot be had here."""
    device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TlpipeError(f"device '{name}' asked for, but no CUDA GPU is visible: use --device auto or cpu")
    return device
