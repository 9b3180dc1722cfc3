"""Why did it predict that? Class-activation heatmaps of the bundle's own prediction path, by
``torchcam`` (a well-kept library with no dependency beyond torch, numpy, matplotlib and Pillow;
``grad-cam`` would bring OpenCV): Grad-CAM (Selvaraju et al., 2017) on the feature map the codes
are pooled from, for the class the bundle predicts, laid over the image as ``tlpipe predict`` sees
it (resized and cropped). Chosen by bench/heatmaps.py (deletion test, hymenoptera model, 48 val
images, hottest 20% of pixels greyed: the top class's probability fell 0.152 for Grad-CAM and
XGrad-CAM, 0.143-0.144 for Grad-CAM++ and LayerCAM, 0.022 for a random map; all ~44 images/s).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from tlpipe.bundle.folder import Bundle
from tlpipe.models import PENULTIMATE
from tlpipe.utils import atomic_write

OVERLAY_ALPHA = 0.5
CHUNK = 32  # images decoded at a time: --explain over a large folder holds one chunk, not the folder


class BundleLogits(nn.Module):
    """Pixels (float, 0..1, NCHW) in, the bundle head's calibrated scores out: a differentiable copy of
    the path ``Bundle.predict`` takes, for the heatmap's gradients."""

    def __init__(self, bundle: Bundle):
        super().__init__()
        config, head = bundle.backbone.data_config, bundle.head.tensors()
        self.extractor = copy.deepcopy(bundle.extractor).cpu().eval()
        self.hflip, self.extractor.hflip = self.extractor.hflip, False  # one view a pass: the CAM sees the view it explains
        self.register_buffer("mean", torch.tensor(config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("weight", head["weight"].float())
        self.register_buffer("bias", head["bias"].float())
        self.register_buffer("scale", head["scale"].float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        codes = self.extractor((images - self.mean) / self.std)
        return (codes @ self.weight.T + self.bias) * self.scale


def target_layer(bundle: Bundle) -> str | None:
    """The feature map the head reads: the tap's module, or (last features) torchcam's own choice,
    the last map before the pooling."""
    layer = bundle.manifest["codes"]["layer"]
    return None if layer == PENULTIMATE or "+" in layer else f"extractor.model.{layer}"


def heatmaps(bundle: Bundle, images: Sequence[Path]) -> Iterator[tuple[Image.Image, np.ndarray, int]]:
    """For each image, in order: the picture as the model sees it, the heatmap (H, W) in [0, 1] at its
    size, and the class it was drawn for (the top class). ``CHUNK`` images in memory at a time."""
    from torchcam.methods import GradCAM

    from tlpipe.bundle.graph import pixels

    logging.getLogger("torchcam").setLevel(logging.ERROR)  # its note on the layer it picked is ours to give
    network = BundleLogits(bundle)
    shape = tuple(bundle.backbone.data_config["input_size"])
    with GradCAM(network, target_layer=target_layer(bundle), input_shape=shape) as extractor:
        for start in range(0, len(images), CHUNK):
            for picture in torch.from_numpy(pixels(bundle, list(images[start:start + CHUNK]), "float32")):
                heat, top = _heatmap(network, extractor, picture)
                yield Image.fromarray((picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)), heat, top


def _heatmap(network: BundleLogits, extractor, picture: torch.Tensor) -> tuple[np.ndarray, int]:
    """The heatmap of the class the bundle predicts for ``picture``; with flip averaging, the mean of
    each view's map (the mirror's mirrored back): torchcam reads the last pass, so one view a pass."""
    scores = network(picture.unsqueeze(0))
    if network.hflip:
        mirror = network(picture.flip(-1).unsqueeze(0))  # the hooks now hold the mirror's pass
        top = int((scores + mirror).argmax(dim=1))
        cam_mirror = extractor(top, mirror)[0][0].detach().flip(-1)
        cam = (extractor(top, network(picture.unsqueeze(0)))[0][0].detach() + cam_mirror) / 2  # the plain view's own pass
    else:
        top = int(scores.argmax(dim=1))
        cam = extractor(top, scores)[0][0].detach()
    cam = torch.nn.functional.interpolate(cam[None, None], size=picture.shape[1:], mode="bilinear")[0, 0]
    return cam.clamp(0, 1).numpy(), top


def overlay(picture: Image.Image, heat: np.ndarray) -> Image.Image:
    """The heatmap laid over the picture (torchcam's overlay, jet colours)."""
    from torchcam.utils import overlay_mask

    return overlay_mask(picture, Image.fromarray(heat.astype(np.float32)), alpha=OVERLAY_ALPHA)  # float: mode F


def overlay_names(images: Sequence[Path]) -> list[str]:
    """``<n>-<image stem>.png`` per image: numbered, so two images of one name do not collide."""
    return [f"{k:04d}-{Path(image).stem}.png" for k, image in enumerate(images, 1)]


def write_overlays(bundle: Bundle, images: Sequence[Path], out: Path) -> list[Path]:
    """Each image with the heatmap of the class the bundle predicts, as ``out/<overlay_names>``; the
    files written, in the images' order."""
    written = []
    for name, (picture, heat, _) in zip(overlay_names(images), heatmaps(bundle, images)):
        atomic_write(out / name, lambda f, shown=overlay(picture, heat): shown.save(f, format="PNG"), mode="wb")
        written.append(out / name)
    return written
