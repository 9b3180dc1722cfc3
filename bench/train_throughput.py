"""Images/s of tlpipe's fine-tuning step, against a bare PyTorch loop, measured in the same run.

Full fine-tuning (``strategy: full``, AdamW; fp32 on CPU, ``Precision``'s AMP on GPU), classifier
reset to the number of classes, on the first ``--max-images`` train images (``prepare_dataset``
and loading the model are not timed). Three training epochs over the same images:

1. tlpipe (cache): the train loader ``fit_finetune`` builds (``CachedImages`` over the decoded-image
   cache, memory-mapped, ``train_transform`` augmentation, ``EpochSampler``, its DataLoader kwargs,
   persistent workers) feeding ``Finetuner._train_epoch`` with the AdamW groups, schedule,
   criterion and ``Precision`` that ``Finetuner.fit`` sets up; no validation pass. The cache is
   built first, in a temporary directory, and timed on a row of its own.
2. reference: ``model.train()``, forward, ``CrossEntropyLoss``, backward, ``AdamW.step()`` over the
   batches of 1's epoch 1 held in memory, on the device, channels_last. Same model, batch size,
   resolution, memory format and images with no data path: the compute limit, so ``ratio
   tlpipe/reference`` is what the data path and loop cost (1.0: nothing). One difference is tlpipe's:
   with ``freeze_bn_stats`` (the default) its BatchNorm layers stay in eval mode.
3. no cache: loader, sampler, seeds and transform as in 1, but every item decodes its JPEG again each
   epoch with ``decode_square`` (``load_rgb`` in Pillow's JPEG draft mode, bicubic resize of the
   shorter side to ``decode_size``, centre crop): the function that fills the cache, so the pixels
   are identical and only their source differs. Its epoch-2 time is compared with 1's.

Epoch 1 of 1 and 3 is the warm-up (worker start, kernel choice); the reference warms up on one
batch of each shape. Then ``--epochs`` rounds run 1, 2, 3 in turn (epochs 2, 3, ...) and each
figure is the best of its rounds. The ``loader only`` rows iterate the two loaders without a model,
to show where the time goes. On a shared machine another job can halve any figure: use
``--epochs 3`` or more and compare figures from one run only.

Run from the repo root:  python bench/train_throughput.py [--max-images 128] [--workers 0] [--epochs 3]
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from tlpipe.config import load_config
from tlpipe.data import CachedImages, EpochSampler, build_decoded_cache, prepare_dataset, train_transform
from tlpipe.data.decoded import decode_square
from tlpipe.data.loader import decode_size
from tlpipe.device import resolve_device
from tlpipe.models import build_backbone
from tlpipe.utils import default_workers
from tlpipe.training.finetune import Finetuner, Precision, WarmupCosine
from tlpipe.training.layers import freeze_stages, param_groups

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/hymenoptera")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: tlpipe's)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=1, help="timed rounds after the warm-up epoch; the best is kept")
    parser.add_argument("--max-images", type=int, default=128, help="use only the first N train images")
    return parser.parse_args()


def timed(run):
    """(seconds ``run()`` took, what it returned)."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


class DecodeEachTime(list):
    """Stands in for the cache array: item ``i`` is decoded from its file on every read."""

    def __init__(self, paths, size: int, crop: int):
        super().__init__(paths)
        self.size, self.crop = size, crop

    def __getitem__(self, index: int):
        return decode_square(super().__getitem__(index), self.size, self.crop)


def main() -> None:
    args = parse_args()
    config = load_config(strategy="full", backbone=args.backbone, batch_size=args.batch_size,
                         num_workers=args.workers, image_size=args.image_size)
    device, ft = resolve_device(config.device), config.finetune
    spec = prepare_dataset(args.data, config.val_fraction, config.seed)
    samples = spec.splits["train"][:args.max_images]
    backbone, labels = build_backbone(config), [s.label for s in samples]
    model = backbone.model
    model.reset_classifier(len(spec.classes))
    size, crop = decode_size(backbone.data_config), max(backbone.data_config["input_size"][1:])
    n, workers = len(samples), default_workers(config.num_workers)

    def train_loader(images) -> DataLoader:  # fit_finetune's, over either pixel source
        return DataLoader(
            CachedImages(images, labels, train_transform(backbone.data_config, config.augment)),
            sampler=EpochSampler(n, config.seed), drop_last=n % config.batch_size == 1,
            batch_size=config.batch_size, num_workers=workers, persistent_workers=workers > 0,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(config.seed))

    # Finetuner.fit's setup, then its own _train_epoch; each loader gets its own optimizer and schedule.
    tuner = Finetuner(ft, device)
    freeze_stages(model, None)
    model.to(device, memory_format=torch.channels_last)
    precision, criterion = Precision(device), nn.CrossEntropyLoss(label_smoothing=ft.label_smoothing)

    def tlpipe_trainer(loader: DataLoader):
        optimizer = torch.optim.AdamW(param_groups(model, ft.lr, ft.backbone_lr_mult, ft.weight_decay))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosine((1 + args.epochs) * len(loader), len(loader)))

        def epoch(number: int) -> float:
            loader.sampler.set_epoch(number)
            return timed(lambda: tuner._train_epoch(model, model, loader, optimizer, scheduler, criterion, precision))[0]
        return epoch

    def loader_only(loader: DataLoader) -> float:  # after the epochs above: workers already running
        loader.sampler.set_epoch(args.epochs + 2)
        return timed(lambda: sum(len(y) for _, y in loader))[0]

    def reference_epoch(batches, optimizer) -> float:
        start = time.perf_counter()
        model.train()
        for images, targets in batches:
            loss = nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()  # waits for the device
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="tlpipe-bench-") as cache_dir:
        build_s, cached = timed(lambda: build_decoded_cache(samples, size, Path(cache_dir), config.num_workers, crop=crop))
        cache_loader, file_loader = train_loader(cached), train_loader(DecodeEachTime([s.path for s in samples], size, crop))
        cache_epoch, file_epoch = tlpipe_trainer(cache_loader), tlpipe_trainer(file_loader)
        warm = {"cache": cache_epoch(1), "file": file_epoch(1)}  # worker start, kernel choice
        # The reference trains on the batches of the cache loader's epoch 1, held in memory.
        batches = [(x.to(device, memory_format=torch.channels_last), y.to(device)) for x, y in cache_loader]
        optimizer = torch.optim.AdamW(model.parameters(), lr=ft.lr, weight_decay=ft.weight_decay)
        reference_epoch(list({x.shape: (x, y) for x, y in batches}.values()), optimizer)  # warm-up
        # Rounds of the three in turn, so that a slow spell of the machine hits all three alike.
        best = {"cache": math.inf, "reference": math.inf, "file": math.inf}
        for epoch in range(2, args.epochs + 2):
            best["cache"] = min(best["cache"], cache_epoch(epoch))
            best["reference"] = min(best["reference"], reference_epoch(batches, optimizer))
            best["file"] = min(best["file"], file_epoch(epoch))
        cache_loader_s, file_loader_s = loader_only(cache_loader), loader_only(file_loader)
        del cache_loader, file_loader, cached  # stop the workers and unmap the cache before the directory goes

    print(f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
          f"cpu count {os.cpu_count()}, data {args.data.resolve()} (train split)")
    print(f"backbone {backbone.name}, strategy full, images {n}, batch {config.batch_size}, "
          f"resolution {crop}x{crop} (cache {size}x{size}), workers {workers}, rounds {args.epochs}")
    print(f"{'measurement':<44}{'seconds':>9}{'images/s':>10}")
    rows = (("decoded cache build (once, before epoch 1)", build_s),
            ("tlpipe epoch 1, cache (warm-up, not compared)", warm["cache"]),
            ("tlpipe epoch 2, cache", best["cache"]),
            ("reference (tensors in memory)", best["reference"]),
            ("no-cache epoch 1 (warm-up, not compared)", warm["file"]),
            ("no-cache epoch 2 (decode JPEGs each epoch)", best["file"]),
            ("loader only, cache", cache_loader_s),
            ("loader only, no cache", file_loader_s))
    tlpipe_s, ref_s, nocache_s = best["cache"], best["reference"], best["file"]
    for name, seconds in rows:
        print(f"{name:<44}{seconds:>9.2f}{n / seconds:>10.1f}")
    print(f"ratio tlpipe/reference (images/s): {ref_s / tlpipe_s:.2f}")
    print(f"ratio epoch-2 time no-cache/cache: {nocache_s / tlpipe_s:.2f}")


if __name__ == "__main__":
    main()
