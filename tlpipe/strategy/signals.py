"""Cheap signals of how well a frozen ImageNet network transfers to the user's data.

The choice between a linear classifier on the last or an earlier stage, partial and full fine-tuning
depends on how far the data is from ImageNet and how much of the task the frozen features already
solve. Both can be read from the one forward pass the linear strategy needs anyway for its codes:
hooks collect every stage's pooled features and the inputs of every BatchNorm layer alongside the
penultimate codes and the ImageNet logits (``collect_features``); ``compute_signals`` then scores
them in seconds (cross-validated probes, kNN, LogME, BatchNorm-statistics gaps, ImageNet confidence).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import nn

from tlpipe.cache import cache_key, load_cached, save_cached
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec, Sample, eval_loader, stratified_order
from tlpipe.device import resolve_device
from tlpipe.errors import TlpipeError
from tlpipe.models import PENULTIMATE, Backbone, Hooks, extract_codes, feature_layers, pool_tap
from tlpipe.strategy.logme import logme

PROBE_C = 0.1  # fixed: the probe ranks stages and datasets, it is not the final classifier
KNN_K = 10
MAX_FOLDS = 5
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
    indices: np.ndarray  # rows of the given samples these are, in order (all unless max_images)
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
    start, counts = time.monotonic(), spec.counts()
    share = counts["train"] / max(counts["train"] + counts.get("val", 0), 1)
    deadlines = {"train": None if seconds is None else start + share * seconds,
                 "val": None if seconds is None else start + seconds}
    return {split: collect_features(backbone, spec.splits[split], config, batchnorm=split == "train", cache=cache,
                                    deadline=deadlines[split])
            for split in ("train", "val")}


def collect_features(
    backbone: Backbone, samples: list[Sample], config: FitConfig, max_images: int | None = None,
    batchnorm: bool = True, cache: Path | None = None, deadline: float | None = None,
) -> FeatureSet:
    """One pass of the frozen backbone over ``samples`` (the pipeline's eval preprocessing, device
    and batch size) that keeps everything the signals need. ``batchnorm=False`` skips the BatchNorm
    statistics (most of the hooks' cost) where no signal is computed, e.g. on the val split.
    ``cache``: a folder where a whole pass is kept (``<cache>/signals/<key>.npz``, the key as the codes
    cache's), so a second fit on the same data does not run the pass again. The images go through in
    ``stratified_order``: a pass stopped at ``deadline`` (``time.monotonic()``) holds a stratified
    sample, whose rows ``indices`` name."""
    start = time.perf_counter()
    model, stages = backbone.model, feature_layers(backbone.model)
    given = np.array([s.label for s in samples])
    passed = stratified_order(given, config.seed)[:max_images]  # rows, in pass order: one image a class first
    indices = np.sort(passed)
    path = key = None
    if cache is not None:
        key = cache_key([samples[i] for i in indices], **backbone.cache_identity(), device=resolve_device(config.device).type,
                        signals=stages, layer_relu=config.layer_relu, batchnorm=batchnorm and BATCHNORM_IMAGES,
                        imagenet="top probability, entropy")
        path = Path(cache) / "signals" / f"{key}.npz"
        saved = load_cached(path, key)
        if saved is not None:
            return _from_arrays(saved, stages)
    taps = _Taps(model, stages, config.layer_relu, has_imagenet_head(backbone))
    bn_stage = batchnorm_stages(model, stages)
    moments = _BatchNormMoments(model, list(bn_stage) if batchnorm else [], BATCHNORM_IMAGES)  # the first images passed
    pytorch: dict = {}
    with Hooks() as hooks:
        taps.attach(hooks)
        moments.attach(hooks)
        loader = eval_loader([samples[i] for i in passed], backbone.data_config, config.batch_size, config.num_workers)
        out, labels = extract_codes(taps, loader, resolve_device(config.device), "Transfer signals",
                                    torch_first=BATCHNORM_IMAGES if batchnorm else 0, pytorch_time=pytorch,
                                    rows=np.searchsorted(indices, passed), deadline=deadline,
                                    at_least=0 if given.ndim == 2 else len(np.unique(given[passed])))  # every class
    whole = len(labels) == len(indices)
    if not whole:  # stopped at the deadline: the rows it reached
        indices = np.sort(passed[:len(labels)])
    parts = np.split(out, np.cumsum(taps.widths)[:-1], axis=1)
    bn_stats: dict[str, list[BatchNormStats]] = {name: [] for name in [*stages, PENULTIMATE]}
    for name, layer in moments.stats().items():
        bn_stats[bn_stage[name]].append(layer)
    features = FeatureSet(
        codes=parts[0], stages=dict(zip(stages, parts[1 + taps.logits:])),
        imagenet_confidence=parts[1] if taps.logits else None, bn_stats=bn_stats, labels=labels,
        indices=indices, seconds=time.perf_counter() - start,
    )
    if pytorch["images"] == len(labels):  # all in PyTorch: the whole pass, as measured
        features.pytorch_seconds_per_image = features.seconds / max(len(labels), 1)
    elif pytorch["images"] > 2:  # more than onnx_pass's check
        features.pytorch_seconds_per_image = pytorch["seconds"] / pytorch["images"]
    if path is not None and whole:
        save_cached(path, key, _to_arrays(features))
    return features


_BN_FIELDS = ("mean", "var", "running_mean", "running_var")


def _to_arrays(features: FeatureSet) -> dict[str, np.ndarray]:
    """``features`` as named arrays for ``np.savez`` (no pickle): stage ``s`` as ``stage|s``, each
    BatchNorm layer's moments as ``bn|<level>|<layer>|<field>``, in order."""
    arrays = {"codes": features.codes, "labels": features.labels, "indices": features.indices,
              "seconds": np.array(features.seconds)}
    if features.pytorch_seconds_per_image is not None:
        arrays["pytorch_seconds_per_image"] = np.array(features.pytorch_seconds_per_image)
    arrays.update({f"stage|{name}": x for name, x in features.stages.items()})
    if features.imagenet_confidence is not None:
        arrays["imagenet_confidence"] = features.imagenet_confidence
    for level, layers in features.bn_stats.items():
        for bn in layers:
            arrays.update({f"bn|{level}|{bn.layer}|{f}": getattr(bn, f) for f in _BN_FIELDS})
            arrays[f"bn|{level}|{bn.layer}|eps"] = np.array(bn.eps)
    return arrays


def _from_arrays(arrays: dict[str, np.ndarray], stages: list[str]) -> FeatureSet:
    bn_stats: dict[str, list[BatchNormStats]] = {name: [] for name in [*stages, PENULTIMATE]}
    for name in arrays:
        if name.startswith("bn|") and name.endswith("|eps"):
            _, level, layer, _ = name.split("|")
            prefix = f"bn|{level}|{layer}|"
            bn_stats[level].append(BatchNormStats(layer, *(arrays[prefix + f] for f in _BN_FIELDS), float(arrays[name])))
    return FeatureSet(
        codes=arrays["codes"], stages={name: arrays[f"stage|{name}"] for name in stages},
        imagenet_confidence=arrays.get("imagenet_confidence"), bn_stats=bn_stats, labels=arrays["labels"],
        indices=arrays["indices"], seconds=float(arrays["seconds"]),
        pytorch_seconds_per_image=float(arrays["pytorch_seconds_per_image"]) if "pytorch_seconds_per_image" in arrays else None,
    )


@dataclass
class Signals:
    """How well the frozen network fits the data. Each entry of ``stages`` (feature_info order) and
    ``penultimate`` holds ``probe_accuracy``: logistic regression (C = ``PROBE_C``) on standardised
    features, mean over stratified folds (``probe_std``, ``probe_sem`` over the folds); ``knn_accuracy``:
    distance-weighted cosine kNN on standardised features, same folds; ``logme`` on the raw features;
    ``bn_gap``: mean of ``BatchNormStats.gap`` over that level's BatchNorm layers (NaN without any);
    ``dim``. A multi-label set (``score`` mAP): one-vs-rest probes, each probe's and kNN's figure
    the mean average precision, folds by iterative stratification, LogME on the 0/1 label matrix."""

    stages: list[dict]
    best_stage: str  # highest probe accuracy, ties to kNN accuracy
    penultimate: dict
    imagenet_confidence: dict  # mean_max_prob, mean_entropy (nats); empty without the ImageNet head
    domain_gap: float  # mean bn_gap over the stages and the penultimate level: each depth counts once
    folds: int
    seconds: float  # compute_signals itself (the forward pass is FeatureSet.seconds)
    score: str = "accuracy"  # what probe_accuracy and knn_accuracy measure: accuracy, or mAP (multi-label)

    def to_dict(self) -> dict:
        return asdict(self)


def _scores(X: np.ndarray, y: np.ndarray, cv: list, neighbours: int) -> dict:
    """Cross-validated linear probe and cosine kNN on standardised features, plus LogME on the raw
    ones; for a 0/1 label matrix, one probe per class and both scored by mean average precision."""
    multilabel = y.ndim == 2
    classifier = LogisticRegression(C=PROBE_C, max_iter=1000)
    probe = make_pipeline(StandardScaler(), OneVsRestClassifier(classifier) if multilabel else classifier)
    knn = make_pipeline(StandardScaler(), KNeighborsClassifier(neighbours, weights="distance", metric="cosine"))
    scoring = "average_precision" if multilabel else None
    probe_acc = cross_val_score(probe, X, y, cv=cv, scoring=scoring)
    return {
        "probe_accuracy": float(probe_acc.mean()), "probe_std": float(probe_acc.std()),
        "probe_sem": float(probe_acc.std(ddof=1) / np.sqrt(len(probe_acc))),
        "knn_accuracy": float(cross_val_score(knn, X, y, cv=cv, scoring=scoring).mean()), "logme": logme(X, y),
        "dim": int(X.shape[1]),
    }


def _bn_gap(layers: list[BatchNormStats]) -> float:
    return float(np.mean([layer.gap() for layer in layers])) if layers else float("nan")


def compute_signals(features: FeatureSet, seed: int = 0) -> Signals:
    """Score every stage and the penultimate codes; see ``Signals``. BLAS runs on one thread: on
    matrices this small, two threads on a busy 2-core machine made it 6x slower (hymenoptera)."""
    with threadpool_limits(1):
        return _compute_signals(features, seed)


def _compute_signals(features: FeatureSet, seed: int) -> Signals:
    start = time.perf_counter()
    y = features.labels
    multilabel = y.ndim == 2
    folds = min(MAX_FOLDS, int(y.sum(axis=0).min() if multilabel else np.bincount(y)[np.unique(y)].min()))
    if folds < 2:
        raise TlpipeError("the transfer signals that choose the strategy need at least 2 train images in every class: "
                          "add images, or name the strategy (--strategy linear fits on 1 image a class)")
    splitter = MultilabelStratifiedKFold if multilabel else StratifiedKFold
    cv = list(splitter(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))  # the same folds for all
    neighbours = min(KNN_K, min(len(train) for train, _ in cv))
    gaps = {name: _bn_gap(layers) for name, layers in features.bn_stats.items()}
    stages = [
        {"name": name, **_scores(X, y, cv, neighbours), "bn_gap": gaps.get(name, float("nan"))}
        for name, X in features.stages.items()
    ]
    penultimate = {**_scores(features.codes, y, cv, neighbours), "bn_gap": gaps.get(PENULTIMATE, float("nan"))}
    confidence = {}
    if features.imagenet_confidence is not None:
        top, entropy = features.imagenet_confidence.astype(np.float64).mean(axis=0)
        confidence = {"mean_max_prob": float(top), "mean_entropy": float(entropy)}
    # Each depth counts once, whatever number of blocks the architecture puts in it: low-level
    # shifts (colour, texture: microscopy, aerial views) and high-level ones both move the summary.
    levels = [s["bn_gap"] for s in [*stages, penultimate] if not np.isnan(s["bn_gap"])]
    best = max(stages, key=lambda s: (s["probe_accuracy"], s["knn_accuracy"]))["name"] if stages else PENULTIMATE
    return Signals(
        stages=stages,
        best_stage=best,
        penultimate=penultimate, imagenet_confidence=confidence,
        domain_gap=float(np.mean(levels)) if levels else float("nan"),
        folds=folds, seconds=time.perf_counter() - start, score="mAP" if multilabel else "accuracy",
    )
