"""Training stage: each transfer strategy as one function from (backbone, checked data, config, codes)
to a trained head.

All of them end the same way: a ``LinearHead`` on the backbone's penultimate codes (for the
fine-tuned ones, the network's own new classifier), so prediction and the bundle are one path.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tlpipe.budget import worker_options
from tlpipe.cache import cache_root
from tlpipe.config import FinetuneConfig, FitConfig, fit_identity
from tlpipe.data import (
    CachedImages, DatasetSpec, EpochSampler, build_decoded_cache, eval_array_transform, eval_loader, stratified_subset,
    train_transform,
)
from tlpipe.data.loader import cached_resize, decode_size
from tlpipe.device import resolve_device
from tlpipe.models import PENULTIMATE, Backbone, dataset_codes
from tlpipe.run.folder import RunFolder
from tlpipe.training.checkpoint import Checkpoints
from tlpipe.training.checks import Diverged, EpochAllowance, LearningCheck
from tlpipe.training.distributed import DistContext, rank_device
from tlpipe.training.frozen import FrozenOutputs, FrozenPrefix
from tlpipe.training.finetune import Finetuner, Precision, evaluate, training_loss
from tlpipe.training.layers import adapt_batchnorm, freeze_stages, trained_batchnorms
from tlpipe.training.memory import available_memory, estimate_memory
from tlpipe.training.head import LinearHead
from tlpipe.training.linear import LinearProbe
from tlpipe.training.multilabel import DEFAULT_THRESHOLD, MultilabelProbe
from tlpipe.utils import default_workers, read_json, write_json


EPOCH_VAL_IMAGES = 1000  # a larger val split scores each epoch on this many (stratified, fixed): SE about 1.3 points at 80%
RESTART_LR_FACTOR = 0.1  # a fine-tune that did not start learning is tried again at this share of its learning rates
MAX_RESTARTS = 1
ADAPT_BN_IMAGES = 512  # training images that re-estimate the statistics of BatchNorm layers that will train
RESTARTS = "restarts.json"
DID_NOT_LEARN = "the fine-tune did not learn"


class DidNotLearn(Exception):
    """Every attempt of a fine-tune failed to start learning; ``restarts`` says each one's signs."""

    def __init__(self, restarts: list[dict]):
        self.restarts = restarts
        super().__init__(f"{DID_NOT_LEARN}: " + "; then ".join(
            f"at head LR {r['lr']:.2g}, {r['reason']}" for r in restarts))


@dataclass(frozen=True)
class TrainedHead:
    """A trained head and what decides what follows from it: its val accuracy (multi-label: mean
    average precision; a trial's score, the guard's baseline), a linear head's C (trial 0 of a study that tunes it; the classifier is the
    head's ``kind``) and a fine-tune's epochs; ``details`` only shows them."""

    head: LinearHead
    val_accuracy: float  # as the fit measured it: the chosen classifier's; a fine-tune's best epoch, on the whole val split
    details: dict = field(default_factory=dict)  # what the report and the run log show: never read to decide
    history: list[dict] = field(default_factory=list)  # per-epoch metrics (fine-tuning)
    backbone: Backbone | None = None  # a fine-tune's network, trained on its own copy; None: the pretrained one's codes
    hflip: bool = False  # test-time flip averaging, chosen on val (stages.check): the bundle predicts with it
    C: float | None = None  # a linear head's
    epochs_fitted: int | None = None  # a fine-tune's epochs, fitted to its time
    cut_by_deadline: bool = False  # a fine-tune stopped by its deadline, not by its epochs or early stopping

    @property
    def backbone_trained(self) -> bool:
        return self.backbone is not None

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    def linear_params(self) -> dict:
        """A linear head's classifier and C as trial params: trial 0 of a study that tunes it."""
        return {"classifier": self.head.kind, "C": self.C}


def linear_probe(config: FitConfig, X, y, X_val, y_val, classifiers=None) -> LinearProbe | MultilabelProbe:
    """The recipe's linear probe fitted on the codes; for a 0/1 label matrix, one-vs-rest logistic regression."""
    lin = config.linear
    if y.ndim == 2:
        return MultilabelProbe(tuple(lin.c_grid), lin.cv_folds, config.seed).fit(X, y, X_val, y_val)
    return LinearProbe(tuple(classifiers or lin.classifiers), tuple(lin.c_grid), lin.cv_folds, config.seed).fit(X, y, X_val, y_val)


def fit_linear(config: FitConfig, codes: dict) -> TrainedHead:
    """Strategy 1: a linear classifier on frozen codes. ``codes`` holds train/val codes (reused)."""
    probe = linear_probe(config, *codes["train"], *codes["val"])
    details = {"chosen": probe.chosen_, "candidates": probe.summary(), **({"cv_note": probe.cv_note_} if probe.cv_note_ else {})}
    return TrainedHead(probe.head_, probe.val_score_, details, C=probe.C_)


MAX_POSITIVE_WEIGHT = 10.0  # multi-label: a rare class's positives weigh at most this many images


def class_weights(spec: DatasetSpec, mode: str) -> torch.Tensor | None:
    """Inverse-frequency weights when asked, or (auto) when the largest class has over 3x the
    smallest; multi-label: each class's positives weighed by its negatives over its positives (at
    most ``MAX_POSITIVE_WEIGHT``, at least 1), so a rare class is not learnt as always absent."""
    counts = np.array(list(spec.class_counts("train").values()), dtype=np.float64)
    if mode == "off" or (mode == "auto" and counts.max() <= 3 * counts.min()):
        return None
    if spec.multilabel:
        negatives = len(spec.splits["train"]) - counts
        return torch.tensor(np.clip(negatives / np.maximum(counts, 1), 1.0, MAX_POSITIVE_WEIGHT), dtype=torch.float32)
    return torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32)


def _own_copy(backbone: Backbone) -> Backbone:
    """The network a fine-tune trains: a copy made on the CPU, so a GPU holds one network. The
    caller's weights stay as they are; its network waits on the CPU (each pass moves it where it runs)."""
    return dataclasses.replace(backbone, model=copy.deepcopy(backbone.model.cpu()),
                               data_config=copy.deepcopy(backbone.data_config))


def fit_finetune(backbone: Backbone, spec: DatasetSpec, config: FitConfig, out: Path, codes: dict,
                 on_epoch: Callable[[int, dict], None] | None = None, context: DistContext = DistContext(),
                 deadline: float | None = None, allowance: EpochAllowance | None = None,
                 kept: FrozenOutputs | None = None) -> TrainedHead:
    """Strategies 2 (partial: ``config.finetune.unfreeze_stages``) and 3 (full), both LP-FT: the new
    classifier starts as the softmax probe fitted on the frozen codes at the training resolution
    (``starting_probe``), then the network trains, at ``config.finetune.image_size`` when set. A run
    that does not start learning is restarted once at a lower learning rate, then given up
    (``DidNotLearn``). Under torchrun (``context``), each rank trains on its share; rank 0 writes the
    checkpoints. ``deadline``: no epoch starts that would end after it; ``allowance``: the epochs
    are re-fitted to it after the first; ``kept``: frozen-stage outputs shared with the study's other
    fine-tunes. It trains a copy of ``backbone``, returned in the head."""
    backbone = _own_copy(backbone)
    model, ft = backbone.model, config.finetune
    device = rank_device(resolve_device(config.device), context)
    data_config = training_data_config(backbone, config)
    unfreeze = ft.unfreeze_stages if config.strategy == "partial" else None
    model.reset_classifier(len(spec.classes))
    freeze_stages(model, unfreeze)
    model.to(device, memory_format=torch.channels_last)
    probe, start_codes = starting_probe(backbone, spec, config, codes, data_config, device)
    _start_from_probe(model, probe.head_)
    memory = estimate_memory(model, data_config["input_size"], device)
    batch_size = _batch_size(memory, device, config, context,
                             Checkpoints(out / RunFolder.CHECKPOINTS, _fingerprint(config, backbone, spec, ft), context.is_main))
    epoch_rows = stratified_subset(spec.labels("val"), EPOCH_VAL_IMAGES, config.seed)  # the val images each epoch scores
    train_loader, val_loader, whole_val = loaders = _loaders(data_config, spec, config, out, batch_size, device, context, epoch_rows)
    frozen, train_loader, val_loader = _reuse_frozen(model, data_config, device, config, train_loader, val_loader,
                                                     context.world_size, kept) if unfreeze is not None else (None, train_loader, val_loader)
    weights = class_weights(spec, ft.class_weights)
    check = learning_check(spec, spec.labels("val")[epoch_rows], weights)

    def run(attempt: FinetuneConfig, checkpoints: Path) -> Finetuner:
        return Finetuner(attempt, device, unfreeze, weights, checkpoints, on_epoch, _fingerprint(config, backbone, spec, attempt),
                         context=context, deadline=deadline, frozen=frozen, check=check,
                         allowance=allowance, multilabel=spec.multilabel).fit(model, train_loader, val_loader)

    # Seeded on a fork of the global RNG: the run is reproducible and the caller's RNG is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(config.seed)
        try:
            tuner, restarts = train_until_learning(model, ft, out / RunFolder.CHECKPOINTS, run, context.is_main)
            # epochs were scored (and pruned) on a subset of a large val split; the trial's figure is the whole split's
            val_accuracy = tuner.best_accuracy_ if whole_val is None else evaluate(
                model, whole_val, training_loss(spec.multilabel), device, Precision(device), context)["val_accuracy"]
        finally:
            _stop_workers(*loaders[:2])
    head = _network_head(model, spec)
    reused = [name for name, used, built in (("train", train_loader, loaders[0]), ("val", val_loader, loaders[1]))
              if used is not built]  # the splits whose frozen-stage outputs were computed once
    details = {
        "linear_probe_val_accuracy": probe.val_score_,
        "start_loss": start_loss(probe.head_, start_codes["train"], weights, ft.label_smoothing),
        **_run_details(tuner, restarts, ft.epochs), "image_size": data_config["input_size"][-1], "val_accuracy": val_accuracy,
        "epoch_val_images": len(epoch_rows), "frozen_outputs_reused": reused, "unfreeze_stages": unfreeze,
        "class_weights": None if weights is None else weights.tolist(), "batch_size": batch_size,
        "world_size": context.world_size, "memory_gb_estimated": round(memory.for_batch(batch_size) / 2**30, 2),
    }
    return TrainedHead(head, val_accuracy, details, tuner.history_, backbone, epochs_fitted=tuner.epochs_,
                       cut_by_deadline=tuner.cut_)


def _batch_size(memory, device: torch.device, config: FitConfig, context: DistContext, checkpoints: Checkpoints) -> int:
    """The largest batch the device's free memory holds (at most the recipe's; the same on every
    rank); a resumed run keeps the one it started with (``Checkpoints.started_batch``)."""
    fitted = context.all_min(memory.largest_batch(available_memory(device), cap=config.batch_size))
    return context.broadcast(checkpoints.started_batch(fitted, fits=device.type == "cuda"))


def _network_head(model: nn.Module, spec: DatasetSpec) -> LinearHead:
    """The fine-tuned network's classifier as a ``LinearHead`` (multi-label: a scale and a threshold
    per class, until calibration sets them)."""
    classifier, n = model.get_classifier(), len(spec.classes)
    return LinearHead(classifier.weight.detach().cpu().numpy().copy(), classifier.bias.detach().cpu().numpy().copy(),
                      "finetune", *((np.ones(n), np.full(n, DEFAULT_THRESHOLD)) if spec.multilabel else ()))


def _fingerprint(config: FitConfig, backbone: Backbone, spec: DatasetSpec, attempt: FinetuneConfig) -> str:
    """What a checkpoint is of: the fit, the pretrained weights, the train and val files (their
    labels too: a relabelled image is other data) and the attempt's settings (a restart's lower
    learning rate)."""
    return fit_identity(config, "checkpoint", weights=backbone.weights.sha256, data=spec.identity,
                        attempt=attempt.model_dump(mode="json"))


def _run_details(tuner: Finetuner, restarts: list[dict], epochs_planned: int) -> dict:
    """What the training run did: where its loss started, its restarts, its epochs and its end."""
    return {
        "first_batch_loss": tuner.first_batch_loss_, "restarts": restarts,
        "first_epoch_loss": tuner.history_[0]["train_loss"] if tuner.history_ else None,
        "best_epoch": tuner.best_epoch_, "epochs_run": len(tuner.history_), "epochs_planned": epochs_planned,
        "epochs_fitted": tuner.epochs_, "resumed_from_epoch": tuner.resumed_from_, "cut_by_deadline": tuner.cut_,
        "oom_events": tuner.oom_events_, **{f"params_{k}": v for k, v in tuner.parameter_counts_.items()},
    }


def starting_probe(backbone: Backbone, spec: DatasetSpec, config: FitConfig, codes: dict, data_config: dict,
                   device: torch.device) -> tuple[LinearProbe, dict]:
    """LP-FT's start: the softmax probe fitted on the codes the network computes as it will train,
    and those codes: at the training resolution (cached like any codes) and, when BatchNorm layers
    will train, with their statistics re-estimated on the training images (``adapt_batchnorm``).
    A probe fitted otherwise starts the fine-tune from nonsense: on white-on-black digits, the head
    fitted on 224 px codes gave cross-entropy 22.4 (chance: 2.30) and val accuracy 0.158 on 128 px
    codes, whose scale differs (mean 0.23 against 0.11); fitted on the 128 px codes, 0.058 and 0.908."""
    layers = trained_batchnorms(backbone.model, config.finetune.freeze_bn_stats)
    if layers:
        samples = spec.splits["train"][:: max(1, len(spec.splits["train"]) // ADAPT_BN_IMAGES)][:ADAPT_BN_IMAGES]
        adapt_batchnorm(backbone.model, layers, eval_loader(samples, data_config, config.batch_size, config.num_workers), device)
    if layers or tuple(data_config["input_size"]) != tuple(backbone.data_config["input_size"]):
        sized = dataclasses.replace(backbone, data_config=data_config)
        cache = Path(config.cache_dir) if config.cache_dir else None
        codes = {split: dataset_codes(sized, spec, split, config, PENULTIMATE, cache=cache) for split in ("train", "val")}
    return linear_probe(config, *codes["train"], *codes["val"], classifiers=("logreg",)), codes


def start_loss(head: LinearHead, train_codes: tuple, weights: torch.Tensor | None, label_smoothing: float) -> float:
    """The training loss of the LP-FT start on the un-augmented train codes: where the first epoch
    should begin (the ``LearningCheck`` compares the first epoch with chance)."""
    X, y = train_codes
    criterion = training_loss(head.multilabel, weights, label_smoothing)
    return float(criterion(torch.from_numpy(head.logits(X)), torch.from_numpy(y)))


def learning_check(spec: DatasetSpec, scored: np.ndarray, weights: torch.Tensor | None = None) -> LearningCheck:
    """What a fine-tune of ``spec`` is checked against: chance on the val images each epoch scores
    (their labels ``scored``); for a multi-label set each class's share of the train images and the
    loss's ``weights`` of its positives (chance: mAP of a random ranking, the classes' mean share)."""
    if spec.multilabel:
        shares = tuple(spec.labels("train").mean(axis=0).tolist())
        return LearningCheck(len(spec.classes), float(scored.mean()) if scored.size else 0.0, len(scored), shares,
                             tuple(weights.tolist()) if weights is not None else ())
    counts = np.bincount(scored, minlength=len(spec.classes))
    return LearningCheck(len(spec.classes), 1 / max(int((counts > 0).sum()), 1), len(scored), val_counts=tuple(counts.tolist()))


def train_until_learning(model: nn.Module, ft: FinetuneConfig, checkpoints: Path,
                         run: Callable[[FinetuneConfig, Path], Finetuner], is_main: bool = True) -> tuple[Finetuner, list[dict]]:
    """``run(ft, checkpoints)``; if it did not start learning (``Diverged``), once more from the same
    start at ``RESTART_LR_FACTOR`` times the learning rates (in ``checkpoints/restart-1``), and a
    second failure raises ``DidNotLearn``. The restarts so far are kept in ``checkpoints/restarts.json``,
    so a re-run of a killed fit goes straight to the attempt it was on. Returns the run and the restarts."""
    marker = checkpoints / RESTARTS
    restarts = read_json(marker) if marker.exists() else []
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    while True:
        attempt = ft.model_copy(update={"lr": ft.lr * RESTART_LR_FACTOR ** len(restarts)})
        try:
            return run(attempt, checkpoints / f"restart-{len(restarts)}" if restarts else checkpoints), restarts
        except Diverged as problem:
            restarts.append({"lr": attempt.lr, "backbone_lr": attempt.lr * attempt.backbone_lr_mult, "reason": str(problem)})
        if len(restarts) > MAX_RESTARTS:
            raise DidNotLearn(restarts)
        if is_main:
            write_json(marker, restarts)
        model.load_state_dict(start)


def _reuse_frozen(model: nn.Module, data_config: dict, device: torch.device, config: FitConfig,
                  train_loader: DataLoader, val_loader: DataLoader, ranks: int,
                  kept: FrozenOutputs | None) -> tuple[FrozenPrefix | None, DataLoader, DataLoader]:
    """A partial fine-tune's frozen stages, run once: val's loader (and train's, with augmentation
    off) replaced by one of their outputs, where the model allows it and the host's RAM holds them;
    the outputs from ``kept`` when an earlier fine-tune left them there (None: this fit's alone)."""
    frozen = FrozenPrefix.find(model, data_config["input_size"], device)
    if frozen is None:
        return None, train_loader, val_loader
    precision, kept = Precision(device), FrozenOutputs() if kept is None else kept
    val_loader = frozen.cached_loader(val_loader, device, precision, kept, ranks) or val_loader
    if config.augment.off:
        train_loader = frozen.cached_loader(train_loader, device, precision, kept, ranks) or train_loader
    return frozen, train_loader, val_loader


def _start_from_probe(model: torch.nn.Module, head: LinearHead) -> None:
    """LP-FT: the new classifier for the classes starts as the linear probe's weights."""
    with torch.no_grad():
        model.get_classifier().weight.copy_(torch.from_numpy(head.weight))
        model.get_classifier().bias.copy_(torch.from_numpy(head.bias))


def training_data_config(backbone: Backbone, config: FitConfig) -> dict:
    """The backbone's preprocessing at the fine-tune's resolution (``finetune.image_size``)."""
    size = config.finetune.image_size
    return backbone.at_size(size).data_config if size else dict(backbone.data_config)


def _loaders(data_config: dict, spec: DatasetSpec, config: FitConfig, out: Path, batch_size: int,
             device: torch.device, context: DistContext, epoch_rows: np.ndarray) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """Train (augmented, this rank's share of each epoch) and val loaders over the decoded-image cache:
    each epoch's val (``epoch_rows``: a fixed stratified ``EPOCH_VAL_IMAGES`` of a larger split, what
    early stopping and the pruner compare), and the whole val split when that differs (None otherwise)."""
    size, crop = decode_size(data_config), max(data_config["input_size"][1:])
    with context.main_first():  # one rank decodes, the others then open the same files
        arrays = {split: build_decoded_cache(spec.splits[split], size, cache_root(config.cache_dir, out),
                                             config.num_workers, crop=crop, **cached_resize(data_config))
                  for split in ("train", "val")}
    labels = {split: [s.target for s in spec.splits[split]] for split in ("train", "val")}
    workers = default_workers(config.num_workers)
    # The loaders get their own generator: drawing worker seeds from the global RNG would shift the
    # dropout stream when a resumed run starts its workers at another epoch than an unbroken run.
    common = dict(batch_size=batch_size, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                  generator=torch.Generator().manual_seed(config.seed), **worker_options(workers))
    sampler = EpochSampler(len(labels["train"]), config.seed, num_replicas=context.world_size, rank=context.rank)
    train_loader = DataLoader(
        CachedImages(arrays["train"], labels["train"], train_transform(data_config, config.augment)),
        sampler=sampler, drop_last=len(sampler) % batch_size == 1, **common)  # no lone-image batch for BatchNorm
    val_images = CachedImages(arrays["val"], labels["val"], eval_array_transform(data_config))
    val_loader = DataLoader(val_images, sampler=epoch_rows[context.rank::context.world_size].tolist(), **common)  # each scored once
    if len(epoch_rows) == len(labels["val"]):
        return train_loader, val_loader, None
    whole = range(context.rank, len(labels["val"]), context.world_size)
    return train_loader, val_loader, DataLoader(val_images, sampler=whole, **{**common, "persistent_workers": False})


def _stop_workers(*loaders: DataLoader) -> None:
    """Stop the loaders' persistent workers now. Left to the garbage collector after an exception (a
    pruned trial raises from ``on_epoch``), their queues can be finalized before the iterator, and
    each worker then waits out DataLoader's 5 s status timeout: 10-20 s lost per pruned trial."""
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()
            loader._iterator = None
