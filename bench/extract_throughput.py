"""Images/s of tlpipe's CNN-code extraction, against the model alone, measured in the same run.

Three timings over the same images (the train split as ``tlpipe fit`` checks and splits it;
``prepare_dataset`` itself is not timed):

1. tlpipe: ``extract_codes`` over ``eval_loader``, exactly what ``dataset_codes`` does: JPEGs
   decoded and transformed in DataLoader workers, then the forward pass (worker start included).
2. model-only (the reference): the same ``CodeExtractor`` over the same batches already in memory,
   on the device and in channels_last as tlpipe moves them, under ``torch.inference_mode`` and the
   same autocast, after warm-up. No pipeline can beat this with the same model and
   resolution, so ``ratio tlpipe/model-only`` says how much the data path costs (1.0: nothing).
3. decode+transform: the loader alone, no model, to show where the gap comes from. Its batches
   are the ones the reference runs on.

Each round runs 3, 2, 1 in that order, so the files are in the page cache for all three and the
model is warm (one batch of each shape) for both 2 and 1. With ``--repeats N`` there are N rounds
and each figure is the best of its N runs. The whole split is held in memory as tensors (about
0.6 MB per image at 224 px): cap it with ``--max-images`` on large datasets. On a shared machine,
another torch job running at the same time can halve any figure: use ``--repeats 3`` or more,
compare figures from one quiet run, and trust the ratio more than the raw rates.

Run from the repo root:  python bench/extract_throughput.py [--workers 0] [--max-images 64]
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch

from tlpipe.config import load_config
from tlpipe.data import eval_loader, prepare_dataset
from tlpipe.device import resolve_device
from tlpipe.models import CodeExtractor, extract_codes
from tlpipe.models import build_backbone

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared/data/hymenoptera")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: tlpipe's)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three measurements; the best of each is kept")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N train images")
    return parser.parse_args()


def timed(run):
    """(seconds ``run()`` took, what it returned)."""
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def forward_batches(extractor: CodeExtractor, batches: list[torch.Tensor], device: torch.device) -> None:
    # Same autocast as extract_codes; .cpu() also waits for CUDA to finish.
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        for images in batches:
            extractor(images).float().cpu()


def main() -> None:
    args = parse_args()
    config = load_config(backbone=args.backbone, batch_size=args.batch_size,
                         num_workers=args.workers, image_size=args.image_size)
    device = resolve_device(config.device)
    spec = prepare_dataset(args.data, config.val_fraction, config.seed)
    samples = spec.splits["train"][:args.max_images]
    backbone = build_backbone(config)
    extractor = CodeExtractor(backbone.model, config.layer, config.layer_relu)
    extractor.eval().to(device, memory_format=torch.channels_last)

    def loader():
        return eval_loader(samples, backbone.data_config, config.batch_size, config.num_workers)

    # Rounds of 3, 2, 1 in turn, so that a slow spell of the machine hits all three alike.
    best = {"decode": math.inf, "model": math.inf, "tlpipe": math.inf}
    for round_ in range(args.repeats):
        seconds, batches = timed(lambda: [images for images, _ in loader()])
        best["decode"] = min(best["decode"], seconds)
        batches = [b.to(device, memory_format=torch.channels_last) for b in batches]
        if round_ == 0:  # warm-up, once per batch shape: oneDNN / cuDNN pick kernels per shape
            forward_batches(extractor, list({b.shape: b for b in batches}.values()), device)
        seconds, _ = timed(lambda: forward_batches(extractor, batches, device))
        best["model"] = min(best["model"], seconds)
        seconds, _ = timed(lambda: extract_codes(extractor, loader(), device))
        best["tlpipe"] = min(best["tlpipe"], seconds)
    n = len(samples)
    tlpipe_rate, model_rate, decode_rate = (n / best[k] for k in ("tlpipe", "model", "decode"))

    size = backbone.data_config["input_size"]
    print(f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
          f"cpu count {os.cpu_count()}")
    print(f"data {args.data.resolve()} (train split)")
    print(f"backbone {backbone.name}, images {n}, batch {config.batch_size}, resolution {size[1]}x{size[2]}, "
          f"workers {loader().num_workers}, repeats {args.repeats}")
    print(f"{'measurement':<28}{'images/s':>10}")
    for name, rate in (("tlpipe (decode+model)", tlpipe_rate), ("model-only (reference)", model_rate),
                       ("decode+transform only", decode_rate)):
        print(f"{name:<28}{rate:>10.1f}")
    print(f"ratio tlpipe/model-only: {tlpipe_rate / model_rate:.2f}")


if __name__ == "__main__":
    main()
