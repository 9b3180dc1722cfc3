"""The one hooked forward pass ``--strategy auto`` makes (``collect_features``): alongside the
penultimate codes, every stage's pooled features, the inputs of the BatchNorm layers (their moments
against the running ones) and the ImageNet head's confidence, which ``signals.compute_signals`` scores.
The pass goes through the images in a stratified order, may stop at a deadline with a stratified
sample, and is cached chunk by chunk as it goes, so a killed pass resumes at its last whole chunk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlpipe.cache import cache_key, load_cached, save_cached
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec, Sample, eval_loader, stratified_order
from tlpipe.device import resolve_device
from tlpipe.models import PENULTIMATE, Backbone, Hooks, chunk_bounds, extract_codes, feature_layers, pool_tap

# BatchNorm moments from this many images (stratified): on hymenoptera and bloodcells the gap of 64,
# 128 and 256 images is within 0.003 of all images', and the hooks cost a quarter of the pass.
BATCHNORM_IMAGES = 128

_CHUNK = 2**24  # elements squared at a time (64 MB of scratch): few ops per batch, bounded memory


@dataclass
class BatchNormStats:
    """One BatchNorm layer: per-channel mean/variance of its inputs over the data, and its own."""

    layer: str
    mean: np.ndarray
    var: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    eps: float

    def gap(self) -> float:
        """Mean over channels of KL(N(mean, var + eps) || N(running_mean, running_var + eps)), in nats:
        ``1/2 [log(q / p) + (p + (mean - running_mean)^2) / q - 1]`` with ``p``, ``q`` the two variances
        (``eps`` as the layer adds it, so a channel that never varies gives a large, finite gap)."""
        p, q = self.var + self.eps, self.running_var + self.eps
        return float(np.mean(0.5 * (np.log(q / p) + (p + (self.mean - self.running_mean) ** 2) / q - 1)))


@dataclass
class FeatureSet:
    """What one forward pass of the frozen backbone yields for a list of images."""

    codes: np.ndarray  # (N, D) penultimate codes, as CodeExtractor(model, "penultimate") gives them
    stages: dict[str, np.ndarray]  # feature_info module -> (N, C), as CodeExtractor(model, module, layer_relu) gives
    # (N, 2): the ImageNet head's top probability and entropy, None when the classifier is not the
    # pretrained ImageNet one (two numbers an image, not its 1,000 logits: 0.25 GB at 60,000 images)
    imagenet_confidence: np.ndarray | None
    bn_stats: dict[str, list[BatchNormStats]]  # stage (or "penultimate": layers after the last stage) -> its BN layers
    labels: np.ndarray  # (N,) int64
    indices: np.ndarray  # rows of the given samples these are, in order (all unless max_images or a deadline)
    seconds: float  # the forward pass
    pytorch_seconds_per_image: float | None = None  # of its batches PyTorch ran (ONNX Runtime is faster; training is not)


class _BatchNormMoments:
    """Forward pre-hooks that total, per BatchNorm layer and channel, the count, sum and sum of squares
    of the layer's input over every pixel of the images, in float64 (``var = E[x^2] - E[x]^2`` is then
    off by about 1e-7 E[x^2], far below the ``eps`` the layer adds). The squares go into one reused
    buffer of at most ``_CHUNK`` elements: into fresh memory they took 3x as long (page faults), and
    cache-sized chunks meant so many small multi-threaded ops that the pass ran 2.5x slower on a busy
    2-core machine. About half of what the BatchNorm layers themselves cost remains. Only the first
    ``max_images`` images of the pass count (``collect_features`` puts a stratified sample first)."""

    def __init__(self, model: nn.Module, names: list[str], max_images: int):
        self.layers: dict[str, nn.BatchNorm2d] = {name: model.get_submodule(name) for name in names}
        self.totals = {name: [0, 0.0, 0.0] for name in names}
        self.images_left = dict.fromkeys(names, max_images)
        self.scratch = torch.empty(0)

    def attach(self, hooks: Hooks) -> None:
        for name, bn in self.layers.items():
            hooks.before(bn, partial(self._add, name))

    def _add(self, name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        images = inputs[0][:self.images_left[name]]
        if not len(images):
            return
        self.images_left[name] -= len(images)
        channels = images.shape[1]
        rows = images.movedim(1, -1).reshape(-1, channels).float()  # a view for channels_last float32
        step = max(1, _CHUNK // channels)
        if self.scratch.numel() < min(len(rows), step) * channels or self.scratch.device != rows.device:
            self.scratch = torch.empty(min(len(rows), step) * channels, device=rows.device)
        squares = [torch.mul(c, c, out=self.scratch[:c.numel()].view(c.shape)).sum(0) for c in rows.split(step)]
        total = self.totals[name]
        total[0] += len(rows)
        total[1] = total[1] + rows.sum(0).double()
        total[2] = total[2] + torch.stack(squares).double().sum(0)

    def stats(self) -> dict[str, BatchNormStats]:
        """Per layer that ran: its input's moments next to its running ones."""
        out = {}
        for name, (count, total, total_sq) in self.totals.items():
            if count:
                mean, second = (total / count).cpu().numpy(), (total_sq / count).cpu().numpy()
                bn = self.layers[name]
                out[name] = BatchNormStats(
                    name, mean, np.maximum(second - mean**2, 0.0),
                    bn.running_mean.double().cpu().numpy(), bn.running_var.double().cpu().numpy(), float(bn.eps),
                )
        return out


class _Taps(nn.Module):
    """``forward(images)``: [penultimate codes | ImageNet top probability, entropy | each stage pooled],
    one row per image."""

    def __init__(self, model: nn.Module, stages: list[str], relu: bool, logits: bool):
        super().__init__()
        self.model, self.stages, self.relu, self.logits = model, stages, relu, logits
        self.captured: dict[str, torch.Tensor] = {}
        self.widths: list[int] = []  # of the parts, for splitting the rows again

    def attach(self, hooks: Hooks) -> None:
        for name in self.stages:
            hooks.after(self.model.get_submodule(name), partial(self._capture, name))

    def _capture(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.captured[name] = output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        parts = [self.model.forward_head(features, pre_logits=True)]
        if self.logits:
            log_p = self.model.forward_head(features).float().log_softmax(1)
            parts.append(torch.stack([log_p.max(1).values.exp(), -(log_p.exp() * log_p).sum(1)], 1))
        for name in self.stages:
            parts.append(pool_tap(self.captured.pop(name), self.relu))
        self.widths = [p.shape[1] for p in parts]
        return torch.cat([p.float() for p in parts], 1)


def batchnorm_stages(model: nn.Module, stages: list[str]) -> dict[str, str]:
    """BatchNorm2d layer -> the stage whose forward runs it: the first stage module that ends at or
    after the layer in module order (so the stem goes to the first stage, ``blocks.3`` to ``blocks.4``
    when the stages are ``blocks.2`` and ``blocks.4``); layers after the last stage -> "penultimate".
    Module order is forward order in timm's CNNs."""
    names = [name for name, _ in model.named_modules()]
    ends = [max(i for i, n in enumerate(names) if n == s or n.startswith(s + ".")) for s in stages]
    return {
        name: next((s for s, end in zip(stages, ends) if i <= end), PENULTIMATE)
        for i, (name, module) in enumerate(model.named_modules()) if isinstance(module, nn.BatchNorm2d)
    }


def has_imagenet_head(backbone: Backbone) -> bool:
    """The classifier is the pretrained 1000-class one (not random, not replaced). A weights file
    without a classifier leaves a random one that this cannot tell apart."""
    model = backbone.model
    classes = getattr(model, "num_classes", None)
    return backbone.weights.kind != "none" and classes == model.pretrained_cfg.get("num_classes") == 1000


def collect_splits(backbone: Backbone, spec: DatasetSpec, config: FitConfig, cache: Path | None = None,
                   seconds: float | None = None) -> dict[str, FeatureSet]:
    """The one hooked pass ``--strategy auto`` makes over train and val (``collect_features``;
    BatchNorm moments on train only: no signal is computed on val), within ``seconds`` (None: no
    limit) shared by the splits in proportion to their images."""
    deadlines = split_deadlines(spec.counts(), seconds)
    return {split: collect_features(backbone, spec.splits[split], config, batchnorm=split == "train", cache=cache,
                                    deadline=deadlines[split])
            for split in ("train", "val")}


def split_deadlines(counts: dict[str, int], seconds: float | None) -> dict[str, float | None]:
    """The ``time.monotonic()`` by which a pass over train then val that may take ``seconds`` (None: no
    limit) ends each split: the time shared by their images."""
    if seconds is None:
        return {"train": None, "val": None}
    start, share = time.monotonic(), counts["train"] / max(counts["train"] + counts.get("val", 0), 1)
    return {"train": start + share * seconds, "val": start + seconds}


def collect_features(
    backbone: Backbone, samples: list[Sample], config: FitConfig, max_images: int | None = None,
    batchnorm: bool = True, cache: Path | None = None, deadline: float | None = None,
) -> FeatureSet:
    """One pass of the frozen backbone over ``samples`` (the pipeline's eval preprocessing, device
    and batch size) that keeps everything the signals need. ``batchnorm=False`` skips the BatchNorm
    statistics (most of the hooks' cost) where no signal is computed, e.g. on the val split. The
    images go through in ``stratified_order``: a pass stopped at ``deadline`` (``time.monotonic()``)
    holds a stratified sample, whose rows ``indices`` name (never less than one image a class).
    ``cache``: a folder where the pass is kept chunk by chunk as it goes (``<cache>/signals/<key>.npz``,
    ``CODES_CHUNK`` images of the pass order an entry, keyed as the codes cache's): a second fit on the
    same data does not run the pass again, a killed one resumes at its last whole chunk."""
    stages = feature_layers(backbone.model)
    given = np.array([s.label for s in samples])
    passed = stratified_order(given, config.seed)[:max_images]  # rows, in pass order: one image a class first
    floor = 0 if given.ndim == 2 else len(np.unique(given[passed]))
    indices, first_part, out, labels, done, seconds = np.sort(passed), None, None, None, 0, 0.0
    for start, end in chunk_bounds(len(passed)) if cache is not None else [(0, len(passed))]:
        if deadline is not None and start and time.monotonic() >= deadline:
            break  # the first chunk always runs: it holds one image a class first
        rows = passed[start:end]
        part = _chunk_pass(backbone, [samples[i] for i in rows], config, stages, batchnorm and start == 0, cache,
                           deadline, max(0, floor - start))
        if out is None:  # one array for the whole pass, each chunk written to its rows as it comes
            first_part = part
            out = np.empty((len(passed), part.out.shape[1]), np.float32)
            labels = np.empty((len(passed), *part.labels.shape[1:]), np.int64)
        at = np.searchsorted(indices, rows[:len(part.labels)])
        out[at], labels[at] = part.out, part.labels
        done, seconds = done + len(part.labels), seconds + part.seconds
        if len(part.labels) < len(rows):
            break
    if done < len(passed):  # stopped at the deadline: the rows it reached
        reached = np.sort(passed[:done])
        keep = np.searchsorted(indices, reached)
        out, labels, indices = out[keep], labels[keep], reached
    logits = has_imagenet_head(backbone)
    parts = np.split(out, np.cumsum(first_part.widths)[:-1], axis=1)
    return FeatureSet(codes=parts[0], stages=dict(zip(stages, parts[1 + logits:])),
                      imagenet_confidence=parts[1] if logits else None, bn_stats=first_part.bn_stats, labels=labels,
                      indices=indices, seconds=seconds, pytorch_seconds_per_image=first_part.pytorch_seconds_per_image)


@dataclass
class _Part:
    """One chunk of the pass: each image's taps side by side (``widths`` apart), its labels, the
    BatchNorm moments (the first chunk's: stage -> layers), the seconds it took and PyTorch's pace."""

    out: np.ndarray
    labels: np.ndarray
    widths: list[int]
    bn_stats: dict[str, list[BatchNormStats]]
    seconds: float
    pytorch_seconds_per_image: float | None


def _chunk_pass(backbone: Backbone, chunk: list[Sample], config: FitConfig, stages: list[str], batchnorm: bool,
                cache: Path | None, deadline: float | None, at_least: int) -> _Part:
    """One chunk's part of the pass: from ``cache`` when whole there, else run (kept there when whole)."""
    device = resolve_device(config.device)
    key = path = None
    if cache is not None:
        key = cache_key(chunk, **backbone.cache_identity(), device=device.type, signals=stages, layer_relu=config.layer_relu,
                        batchnorm=batchnorm and BATCHNORM_IMAGES, imagenet="top probability, entropy")
        path = Path(cache) / "signals" / f"{key}.npz"
        saved = load_cached(path, key)
        if saved is not None and len(saved["labels"]) == len(chunk):
            return _from_arrays(saved, stages)
    start, model = time.perf_counter(), backbone.model
    taps = _Taps(model, stages, config.layer_relu, has_imagenet_head(backbone))
    bn_stage = batchnorm_stages(model, stages)
    moments = _BatchNormMoments(model, list(bn_stage) if batchnorm else [], BATCHNORM_IMAGES)  # the first images passed
    pytorch: dict = {}
    with Hooks() as hooks:
        taps.attach(hooks)
        moments.attach(hooks)
        loader = eval_loader(chunk, backbone.data_config, config.batch_size, config.num_workers)
        out, labels = extract_codes(taps, loader, device, "Transfer signals", torch_first=BATCHNORM_IMAGES if batchnorm else 0,
                                    pytorch_time=pytorch, deadline=deadline, at_least=at_least)
    bn_stats: dict[str, list[BatchNormStats]] = {name: [] for name in [*stages, PENULTIMATE]}
    for name, layer in moments.stats().items():
        bn_stats[bn_stage[name]].append(layer)
    seconds = time.perf_counter() - start
    pace = seconds / max(len(labels), 1) if pytorch["images"] == len(labels) else (  # all in PyTorch: as measured
        pytorch["seconds"] / pytorch["images"] if pytorch["images"] > 2 else None)  # more than onnx_pass's check
    part = _Part(out, labels, taps.widths, bn_stats, seconds, pace)
    if path is not None and len(labels) == len(chunk):
        save_cached(path, key, _to_arrays(part))
    return part


_BN_FIELDS = ("mean", "var", "running_mean", "running_var")


def _to_arrays(part: _Part) -> dict[str, np.ndarray]:
    """``part`` as named arrays for ``np.savez`` (no pickle): each BatchNorm layer's moments as
    ``bn|<level>|<layer>|<field>``, in order."""
    arrays = {"out": part.out, "labels": part.labels, "widths": np.array(part.widths), "seconds": np.array(part.seconds)}
    if part.pytorch_seconds_per_image is not None:
        arrays["pytorch_seconds_per_image"] = np.array(part.pytorch_seconds_per_image)
    for level, layers in part.bn_stats.items():
        for bn in layers:
            arrays.update({f"bn|{level}|{bn.layer}|{f}": getattr(bn, f) for f in _BN_FIELDS})
            arrays[f"bn|{level}|{bn.layer}|eps"] = np.array(bn.eps)
    return arrays


def _from_arrays(arrays: dict[str, np.ndarray], stages: list[str]) -> _Part:
    bn_stats: dict[str, list[BatchNormStats]] = {name: [] for name in [*stages, PENULTIMATE]}
    for name in arrays:
        if name.startswith("bn|") and name.endswith("|eps"):
            _, level, layer, _ = name.split("|")
            prefix = f"bn|{level}|{layer}|"
            bn_stats[level].append(BatchNormStats(layer, *(arrays[prefix + f] for f in _BN_FIELDS), float(arrays[name])))
    pace = arrays.get("pytorch_seconds_per_image")
    return _Part(arrays["out"], arrays["labels"], arrays["widths"].tolist(), bn_stats, float(arrays["seconds"]),
                 None if pace is None else float(pace))
