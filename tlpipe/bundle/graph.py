"""The bundle as one graph from pixels to calibrated probabilities (and the unknown score), what
``tlpipe export`` writes: ``ExportedClassifier``, the ``preprocessing`` a deployment applies before
it, and ``pixels``, that preprocessing done the bundle's way (the graph's input, and the check's)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from tlpipe.bundle.folder import Bundle
from tlpipe.data import eval_transform, load_rgb
from tlpipe.data.loader import decode_size
from tlpipe.bundle.unknowns import DESCRIPTION as UNKNOWN_DESCRIPTION, unit_rows

InputType = Literal["uint8", "float32"]
INPUT, OUTPUT, UNKNOWN_OUTPUT = "images", "probabilities", "unknown_score"


class ExportedClassifier(nn.Module):
    """Pixels in, calibrated probabilities out: what ``Bundle.predict_proba`` computes after the
    resize and crop, as one module with no Python-side state."""

    def __init__(self, bundle: Bundle, input_type: InputType = "uint8"):
        super().__init__()
        config = bundle.backbone.data_config
        self.extractor = copy.deepcopy(bundle.extractor).cpu()  # its own weights: the bundle's move with its device
        self.from_uint8 = input_type == "uint8"
        self.register_buffer("mean", torch.tensor(config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"], dtype=torch.float32).view(1, 3, 1, 1))
        head = bundle.head.tensors()
        self.register_buffer("weight", head["weight"].float())
        self.register_buffer("bias", head["bias"].float())
        self.register_buffer("scale", head["scale"].float())
        self.multilabel = bundle.head.multilabel  # a sigmoid per class: the thresholds travel in the metadata
        self.rejects = bundle.unknowns is not None  # a second output, the unknown score: its threshold in the metadata
        if self.rejects:
            unknowns = bundle.unknowns.tensors()
            self.register_buffer("projection", unknowns["projection"].float())
            self.register_buffer("centres", unknowns["centres"].float())

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if self.from_uint8:
            x = x / 255.0
        codes = self.extractor((x - self.mean) / self.std)
        scores = (codes @ self.weight.T + self.bias) * self.scale
        probabilities = torch.sigmoid(scores) if self.multilabel else torch.softmax(scores, dim=1)
        if not self.rejects:
            return probabilities
        distances = ((unit_rows(codes) @ self.projection).unsqueeze(1) - self.centres.unsqueeze(0)).square().sum(dim=2)
        return probabilities, distances.min(dim=1).values


def preprocessing(bundle: Bundle, input_type: InputType) -> dict:
    """How to turn an image file into the graph's input, as timm's eval transform does it."""
    config = bundle.backbone.data_config
    return {
        "resize_shorter_side": decode_size(config), "interpolation": config["interpolation"],
        "crop_mode": config.get("crop_mode", "center"), "crop": list(config["input_size"][1:]),
        "mean": list(config["mean"]), "std": list(config["std"]),
        "input": {"name": INPUT, "layout": "NCHW", "channels": "RGB", "dtype": input_type,
                  "range": "0..255" if input_type == "uint8" else "0..1"},
        "output": {"name": OUTPUT, "shape": ["batch", len(bundle.classes)], "meaning": (
            "per-class probabilities (a sigmoid each), calibrated: a class is predicted at or over its value in "
            "'thresholds'" if bundle.head.multilabel else "class probabilities, calibrated")},
        "test_time_hflip": bool(bundle.manifest["codes"].get("hflip", False)),
        **({"unknown": {"output": UNKNOWN_OUTPUT, "shape": ["batch"], "threshold": bundle.unknowns.threshold,
                        "meaning": f"{UNKNOWN_DESCRIPTION} ({bundle.unknowns.false_rejection:.0%} of val over it)"}}
           if bundle.unknowns else {}),
    }


def pixels(bundle: Bundle, images: Sequence[Path | Image.Image], input_type: InputType = "uint8") -> np.ndarray:
    """The graph's input for ``images`` (files or decoded pictures): decoded as ``tlpipe predict``
    decodes them, then resized and cropped by the bundle's rule; (N, 3, H, W)."""
    config = bundle.backbone.data_config
    geometry = eval_transform(config).transforms[:-2]  # timm's Resize + CenterCrop, before ToTensor + Normalize
    batch = []
    for image in images:
        picture = image if isinstance(image, Image.Image) else load_rgb(image, decode_size(config))
        for step in geometry:
            picture = step(picture)
        batch.append(np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1))
    out = np.stack(batch) if batch else np.zeros((0, 3, *config["input_size"][1:]), np.uint8)
    return out if input_type == "uint8" else out.astype(np.float32) / 255.0
