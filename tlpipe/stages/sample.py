"""Stage 2 of ``fit``, sample: the images the time limit holds. Every later stage starts from the
frozen pass (each image decoded and run through the backbone once), whose cost grows with the
image count whatever the strategy. On a dataset of more than ``PROBE_FROM`` images that a
pessimistic bound cannot clear, the pass's seconds per image are measured on real train images
through the prediction path; when the whole pass (train, val and test) would take more than
``FROZEN_SHARE`` of the time left, the fit goes on with a stratified sample: the same images for the
same seed, every class in it, class proportions kept, val and test cut in the same proportion. The
data notes (summary, report) say how many images were used and what the full pass would take.
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from tlpipe.budget import every_image_line, format_duration
from tlpipe.data import DatasetSpec, eval_loader, stratified_subset
from tlpipe.device import resolve_device
from tlpipe.models import CodeExtractor, extract_codes
from tlpipe.stages.choose import code_tap
from tlpipe.stages.context import FitContext, Prepared
from tlpipe.strategy.plan import FROZEN_SHARE
from tlpipe.strategy.frozen_pass import collect_features

PROBE_FROM = 2000  # images: below this the pass is cheap next to any time limit tlpipe plans for
SLOWEST_SECONDS_PER_IMAGE = 0.25  # a 2-core CPU, a large backbone: a limit that holds this needs no probe
# Two timed passes: their difference is the per-image cost, without start-up costs. Both longer than
# what the loader workers decode while the first batch is exported to ONNX Runtime (with 128 and 384
# images that hidden part was most of the difference: 3.3 ms an image measured, 9.2 ms in a long pass).
PROBE_IMAGES = (512, 1024)
# A long pass still runs slower than the probe's difference says (the hooked pass on 2 cores, 64 px
# JPEGs: 6.7 ms an image probed, 8.3 ms from 1,000 to 3,000 images, 10.0 over 70,000): the margin
# the plan takes on the measured figure.
PROBE_MARGIN = 1.5
MIN_TRAIN_PER_CLASS, MIN_EVAL_PER_CLASS = 8, 2  # a sample keeps at least this many images a class


def sample(ctx: FitContext, prepared: Prepared) -> Prepared:
    """``prepared`` with a stratified sample of its images when the frozen pass over all of them would
    not fit ``FROZEN_SHARE`` of the time left; as it was otherwise. Under torchrun every rank keeps
    all (a timing per rank would give each another sample)."""
    spec, left = prepared.spec, ctx.budget.left()
    total = sum(spec.counts().values())
    if total <= PROBE_FROM or ctx.ranks.enabled or FROZEN_SHARE * left >= total * SLOWEST_SECONDS_PER_IMAGE:
        return prepared
    with ctx.timings.stage("probe_speed"):
        per_image = PROBE_MARGIN * frozen_seconds_per_image(prepared)
    affordable = int(FROZEN_SHARE * ctx.budget.left() / per_image)
    if total <= affordable:
        return prepared
    sampled = stratified_sample(spec, affordable / total, prepared.config.seed)
    kept = sum(sampled.counts().values())
    note = (f"the frozen pass over all {total:,} images would take about {format_duration(total * per_image)} "
            f"({per_image * 1000:.1f} ms an image, as measured with a margin), more than {FROZEN_SHARE:.0%} of the "
            f"{format_duration(left)} left: this fit used a stratified sample of {kept:,} ("
            + ", ".join(f"{split} {n:,} of {len(spec.splits[split]):,}" for split, n in sampled.counts().items())
            + ")" + every_image_line(ctx.budget.limit, kept, total))
    sampled = dataclasses.replace(sampled, notes=[*spec.notes, note])
    return dataclasses.replace(prepared, spec=sampled, whole=spec)


def stratified_sample(spec: DatasetSpec, share: float, seed: int) -> DatasetSpec:
    """``spec`` with about ``share`` of each class's images in each split, at least
    ``MIN_TRAIN_PER_CLASS`` a class in train and ``MIN_EVAL_PER_CLASS`` in val and test (or all a
    class has): the same images for the same seed, a larger share holding a smaller one's
    (``stratified_subset``; a multi-label split: a seeded ``share`` of its images)."""
    splits = {}
    for split, samples in spec.splits.items():
        least = MIN_TRAIN_PER_CLASS if split == "train" else MIN_EVAL_PER_CLASS
        labels = spec.labels(split)
        if labels.ndim == 2:
            wanted = max(math.ceil(share * len(samples)), least * len(spec.classes))
        else:
            wanted = sum(min(max(math.ceil(share * n), least), n) for n in np.bincount(labels))
        rows = stratified_subset(labels, wanted, seed, least)
        splits[split] = [samples[i] for i in rows]
    return dataclasses.replace(spec, splits=splits)


def frozen_seconds_per_image(prepared: Prepared) -> float:
    """The frozen pass's seconds per image on this machine: two passes over real train images, the
    one the fit will make (decode, eval transform, the backbone to the codes; under auto, the
    hooked pass that also pools every stage), the first's fixed costs (loader workers, the ONNX
    Runtime export) taken out by their difference."""
    spec, config = prepared.spec, prepared.config
    rows = stratified_subset(spec.labels("train"), PROBE_IMAGES[-1], config.seed)
    small, large = (min(n, len(rows)) for n in PROBE_IMAGES)
    seconds = []
    for n in (small, large):
        start = time.perf_counter()
        _frozen_pass(prepared, [spec.splits["train"][i] for i in rows[:n]])
        seconds.append(time.perf_counter() - start)
    if large <= small:
        return seconds[1] / large
    return max((seconds[1] - seconds[0]) / (large - small), seconds[1] / large / 4)  # a floor against timing noise


def _frozen_pass(prepared: Prepared, samples: list) -> None:
    """The frozen pass the choose stage will make, over ``samples``, uncached."""
    config, backbone = prepared.config, prepared.backbone
    if config.strategy == "auto":
        collect_features(backbone, samples, config, batchnorm=False)
        return
    with CodeExtractor(backbone.model, code_tap(config), config.layer_relu) as extractor:
        loader = eval_loader(samples, backbone.data_config, config.batch_size, config.num_workers)
        extract_codes(extractor, loader, resolve_device(config.device), "Timing the frozen pass")
