"""Which class-activation method should explain a bundle's predictions? Speed and faithfulness of
torchcam's GradCAM, GradCAM++, XGradCAM and LayerCAM on the bundle's own prediction path
(``tlpipe.insight.heatmaps.BundleLogits``), against a random heatmap as the floor.

Faithfulness is the deletion test (Petsiuk et al., 2018): the image's hottest ``--share`` of pixels
are greyed out (set to the normalisation mean) and the drop in the predicted class's probability
is measured; a faithful map points at what the prediction rests on, so its drop is large. Speed is
images per second for one map each (forward + backward), single-threaded torch as set.

Run from the repo root:  python bench/heatmaps.py MODEL IMAGES_FOLDER [--n 48 --share 0.2]
(e.g. the bundle of a hymenoptera fit and ../shared/data/hymenoptera/val; about 1 min)
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--share", type=float, default=0.2)
    args = parser.parse_args()
    from torchcam import methods

    from tlpipe.bundle.graph import pixels
    from tlpipe.bundle.folder import load_bundle
    from tlpipe.data.scan import image_files
    from tlpipe.insight.heatmaps import BundleLogits, target_layer

    logging.getLogger("torchcam").setLevel(logging.ERROR)
    bundle = load_bundle(args.model, "cpu")
    images = image_files(args.images)
    images = [images[i] for i in np.linspace(0, len(images) - 1, min(args.n, len(images))).astype(int)]
    network = BundleLogits(bundle)
    batch = torch.from_numpy(pixels(bundle, images, "float32"))
    grey = network.mean.view(3, 1, 1)
    with torch.no_grad():
        base = torch.softmax(network(batch), dim=1)
    top = base.argmax(dim=1)
    keep = int(round(args.share * batch.shape[2] * batch.shape[3]))

    def drop(maps: list[torch.Tensor]) -> float:
        """Mean fall of the top class's probability once each image's hottest pixels are greyed."""
        masked = batch.clone()
        for i, heat in enumerate(maps):
            heat = torch.nn.functional.interpolate(heat[None, None], size=batch.shape[2:], mode="bilinear")[0, 0]
            hottest = heat.flatten().topk(keep).indices
            plane = masked[i].view(3, -1)
            plane[:, hottest] = grey.view(3, 1)
        with torch.no_grad():
            after = torch.softmax(network(masked), dim=1)
        return float((base[torch.arange(len(top)), top] - after[torch.arange(len(top)), top]).mean())

    rng = np.random.default_rng(0)
    print(f"{args.model} on {len(images)} images of {args.images}, deletion of the hottest {args.share:.0%} of pixels")
    print(f"  {'random map':10s} probability drop {drop([torch.from_numpy(rng.random((7, 7), np.float32)) for _ in images]):.3f}")
    for name in ("GradCAM", "GradCAMpp", "XGradCAM", "LayerCAM"):
        start = time.perf_counter()
        with getattr(methods, name)(network, target_layer=target_layer(bundle), input_shape=tuple(batch.shape[1:])) as cam:
            maps = []
            for i, picture in enumerate(batch):
                scores = network(picture.unsqueeze(0))
                maps.append(cam(int(top[i]), scores)[0][0].detach())
        speed = len(images) / (time.perf_counter() - start)
        print(f"  {name:10s} probability drop {drop(maps):.3f}, {speed:.1f} images/s")


if __name__ == "__main__":
    main()
