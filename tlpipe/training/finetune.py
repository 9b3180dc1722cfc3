"""Strategies 2 and 3: partial and full fine-tuning, on plain PyTorch.

``Finetuner(config).fit(model, train_loader, val_loader, ...)`` trains in place and returns self
with ``history_`` and ``best_`` set. The loop is plain PyTorch (no engine: each part of it is one
call of torch's own API). Each epoch ends with an atomic checkpoint of everything needed to go
on exactly (``checkpoint``): model, optimizer, scheduler, scaler, epoch, best metric, history. Re-running resumes;
a finished run is not trained again. With a ``deadline`` (``time.monotonic()``), no epoch starts that
the last one's duration says would end after it: the run ends there, its best epoch kept.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from tlpipe.budget import raise_if_stopped
from tlpipe.config import FinetuneConfig
from tlpipe.training.checkpoint import Checkpoints
from tlpipe.training.checks import Diverged, EpochAllowance, LearningCheck
from tlpipe.training.distributed import DistContext
from tlpipe.training.frozen import FrozenPrefix
from tlpipe.training.layers import freeze_stages, param_groups, train_mode
from tlpipe.training.linear import mean_average_precision


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch's deterministic algorithms for the block only: the switch is process-wide, and the
    caller's code after a fit should run as it did before."""
    if not enabled:
        yield
        return
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


class WarmupCosine:
    """Linear warmup, then cosine to 0 at ``total_steps``: the learning-rate factor of ``LambdaLR``.
    An object, not a closure: ``total_steps`` can be re-spanned after the first epoch, and
    ``LambdaLR.state_dict`` saves an object's attributes, so a resumed run keeps the span."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Precision:
    """AMP settings for the device: bf16 where supported, else fp16 with a gradient scaler; fp32 on CPU."""

    device: torch.device
    dtype: torch.dtype | None = field(init=False)

    def __post_init__(self):
        if self.device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.dtype = None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


class MultilabelLoss(nn.BCEWithLogitsLoss):
    """Binary cross-entropy of each class's logit against its 0/1 target (the loaders give integers)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, target.to(logits.dtype))


def training_loss(multilabel: bool, weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> nn.Module:
    """Cross-entropy over the classes (``weights`` per class); multi-label: binary cross-entropy per
    class, ``weights`` weighing each class's positives (``pos_weight``)."""
    if multilabel:
        return MultilabelLoss(pos_weight=weights)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device, precision: Precision,
             context: DistContext = DistContext()) -> dict:
    """Validation loss, accuracy and balanced accuracy (multi-label, ``MultilabelLoss``: mean average
    precision, one process only); under DDP each rank scores its share (maybe none) and the sums are shared."""
    model.eval()
    multilabel, classes = isinstance(criterion, MultilabelLoss), model.get_classifier().out_features
    loss, correct, n, scored = 0.0, 0, 0, []
    per_class = np.zeros((2, classes), np.int64)  # each class's images and right guesses
    for images, labels in loader:
        raise_if_stopped()
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
        loss += criterion(logits.float(), labels).item() * len(labels)
        if multilabel:
            scored.append((labels.cpu().numpy(), logits.float().cpu().numpy()))
        else:
            right = logits.argmax(1) == labels
            correct += right.sum().item()
            per_class += torch.stack([torch.bincount(labels, minlength=classes),
                                      torch.bincount(labels[right], minlength=classes)]).cpu().numpy()
        n += len(labels)
    loss, correct, n = context.all_sum([loss, correct, n])
    if multilabel:
        return {"val_loss": loss / n, "val_accuracy": mean_average_precision(*(np.concatenate(a) for a in zip(*scored)))}
    images, right = np.array(context.all_sum(per_class.reshape(-1).tolist())).reshape(2, -1)
    recalls = right[images > 0] / images[images > 0]
    return {"val_loss": loss / n, "val_accuracy": correct / n, "val_balanced_accuracy": float(recalls.mean())}


class Finetuner:
    """Fine-tunes a timm model whose classifier already matches the classes (LP-FT: initialise it
    from a linear probe first). ``unfreeze_stages=None`` trains everything (full). Under DDP
    (``context``) every rank calls ``fit`` with its share of the data; rank 0 alone checkpoints."""

    def __init__(self, config: FinetuneConfig, device: torch.device, unfreeze_stages: int | None = None,
                 class_weights: torch.Tensor | None = None, checkpoint_dir: Path | None = None,
                 on_epoch: Callable[[int, dict], None] | None = None, fingerprint: str = "",
                 micro_batch: int | None = None, context: DistContext = DistContext(), deadline: float | None = None,
                 frozen: FrozenPrefix | None = None, check: LearningCheck | None = None,
                 allowance: EpochAllowance | None = None, multilabel: bool = False):
        self.config, self.device, self.unfreeze_stages = config, device, unfreeze_stages
        self.class_weights, self.on_epoch = class_weights, on_epoch
        # fingerprint: what the run is (config + data): a checkpoint of another run is not resumed
        self.checkpoints = Checkpoints(checkpoint_dir, fingerprint, context.is_main)
        self.micro_batch = micro_batch  # None: whole batches; set smaller (or halved on CUDA OOM) to accumulate
        self.context, self.deadline = context, deadline
        self.frozen = frozen  # a loader of its cached outputs runs the model from there
        self.check, self.allowance = check, allowance
        self.multilabel = multilabel  # binary cross-entropy per class; its epochs scored by val mAP
        self.oom_events_: list[dict] = []
        self._record_first = False  # fit turns it on for a run that starts at epoch 0

    def fit(self, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader) -> "Finetuner":
        with deterministic_algorithms(self.config.deterministic):
            return self._fit(model, train_loader, val_loader)

    def _fit(self, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader) -> "Finetuner":
        cfg, device = self.config, self.device
        self.parameter_counts_ = freeze_stages(model, self.unfreeze_stages)
        model.to(device, memory_format=torch.channels_last)
        # DDP averages gradients across ranks; it also broadcasts rank 0's weights at the start.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
            if self.context.enabled else model
        optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay))
        schedule = WarmupCosine(cfg.epochs * len(train_loader), round(cfg.warmup_epochs * len(train_loader)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        precision = Precision(device)
        weights = self.class_weights.to(device) if self.class_weights is not None else None
        criterion = training_loss(self.multilabel, weights, cfg.label_smoothing)
        state = {"epoch": 0, "epochs": cfg.epochs, "best_accuracy": -1.0, "best_epoch": 0, "stale": 0, "history": [],
                 "done": False}
        resumed = self.checkpoints.restore(model, optimizer, scheduler, precision.scaler, state)
        self.first_batch_loss_, self._record_first = None, resumed == 0  # the loss LP-FT starts from, before any step

        while not state["done"] and not self._out_of_time(state):
            epoch = state["epoch"] + 1
            metrics = self._epoch(epoch, model, net, (train_loader, val_loader), optimizer, scheduler, criterion, precision)
            problem = self.check.verdict(epoch, metrics) if self.check else None
            if problem:
                raise Diverged(problem)
            if self.allowance:  # the first epoch sets the epochs; later ones only shorten the run if it falls behind
                recent = [h["epoch_seconds"] for h in state["history"][-2:]] + [metrics["epoch_seconds"]]
                fitted = self.context.all_min(self.allowance.fitted(epoch, sum(recent) / len(recent)))  # ranks agree
                state["epochs"] = fitted if epoch == 1 else min(state["epochs"], fitted)
                schedule.total_steps = state["epochs"] * len(train_loader)
            self._end_epoch(model, state, epoch, metrics)
            self.checkpoints.save(model, optimizer, scheduler, precision.scaler, state)
            if self.on_epoch and self.context.is_main:
                self.on_epoch(epoch, metrics)

        self.cut_ = not state["done"]  # stopped by the deadline: the best epoch so far is the model
        if not hasattr(self, "best_state_"):
            self.best_state_ = self.checkpoints.best()
        model.load_state_dict(self.best_state_)
        model.eval()
        self.history_, self.best_epoch_, self.best_accuracy_ = state["history"], state["best_epoch"], state["best_accuracy"]
        self.resumed_from_, self.epochs_ = resumed, state["epochs"]
        return self

    def _epoch(self, epoch: int, model, net, loaders: tuple[DataLoader, DataLoader], optimizer, scheduler, criterion,
               precision) -> dict:
        """One epoch of training, then val: its metrics, time and learning rates."""
        train_loader, val_loader = loaders
        if hasattr(train_loader.sampler, "set_epoch"):  # augmentation and order depend on the epoch alone
            train_loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        with self._feeding(train_loader):
            train_loss, train_loss_end = self._train_epoch(model, net, train_loader, optimizer, scheduler, criterion, precision)
        with self._feeding(val_loader):
            metrics = {"train_loss": train_loss, "train_loss_end": train_loss_end,
                       **evaluate(model, val_loader, criterion, self.device, precision, self.context)}
        seconds = time.perf_counter() - start
        return {**metrics, "epoch_seconds": seconds, "images_per_second": len(train_loader.dataset) / seconds,
                **{f"lr_{g['name']}": g["lr"] for g in optimizer.param_groups}}

    def _end_epoch(self, model: nn.Module, state: dict, epoch: int, metrics: dict) -> None:
        """``state`` after ``epoch``: its metrics kept, the best weights if it is the best so far, and
        whether the run is done (its epochs run, or early stopping)."""
        state["epoch"] = epoch
        state["history"].append(metrics)
        if metrics["val_accuracy"] > state["best_accuracy"]:
            state.update(best_accuracy=metrics["val_accuracy"], best_epoch=epoch, stale=0)
            self.best_state_ = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.checkpoints.save_best(self.best_state_, epoch)
        else:
            state["stale"] += 1
        # Early stopping waits for the cosine's second half: at the first half's high learning rate val
        # accuracy wobbles (the digits example, 10 epochs: 0.931, 0.911, 0.925, 0.928 stopped it at 5).
        state["done"] = epoch >= state["epochs"] or (state["stale"] >= self.config.patience and 2 * epoch > state["epochs"])

    def _feeding(self, loader: DataLoader):
        return self.frozen.feeding(loader) if self.frozen else nullcontext()

    def _out_of_time(self, state: dict) -> bool:
        """True when the next epoch, as long as the last one, would end after the deadline (the
        first epoch always runs: a fine-tune with no epoch has no model). Agreed across ranks."""
        if self.deadline is None or not state["history"]:
            return False
        late = time.monotonic() + state["history"][-1]["epoch_seconds"] > self.deadline
        return bool(self.context.all_sum([float(late)])[0])

    def _train_epoch(self, model, net, loader, optimizer, scheduler, criterion, precision) -> tuple[float, float]:
        """One pass over ``loader``: the mean train loss, and its mean over the epoch's second half
        (where the epoch ends, past the warmup's first steps); ``net`` is ``model`` or its DDP wrapper."""
        train_mode(model, self.config.freeze_bn_stats)
        total, n, late, n_late = 0.0, 0, 0.0, 0
        for step, (images, labels) in enumerate(loader):
            raise_if_stopped()
            images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(self.device, non_blocking=True)
            loss = self._accumulate(net, images, labels, criterion, precision, optimizer)
            if self._record_first:
                self.first_batch_loss_, self._record_first = loss, False
            # Every later step would only spread it. Under DDP the epoch's summed loss says it on every rank;
            # with fp16's gradient scaler, a step whose values overflow is skipped by design.
            if self.check and not self.context.enabled and not precision.scaler.is_enabled() and not math.isfinite(loss):
                raise Diverged(f"the train loss is {loss} at step {step + 1}")
            precision.scaler.step(optimizer)
            precision.scaler.update()
            scheduler.step()
            total += loss * len(labels)
            n += len(labels)
            if step >= len(loader) // 2:
                late, n_late = late + loss * len(labels), n_late + len(labels)
        total, n, late, n_late = self.context.all_sum([total, n, late, n_late])
        return total / max(n, 1), late / max(n_late, 1)

    def _accumulate(self, net, images, labels, criterion, precision, optimizer) -> float:
        """Gradients of one batch, in micro-batches of ``micro_batch``. A CUDA out-of-memory halves
        the micro-batch and redoes the batch: the effective batch (and so the run) is unchanged.
        Under DDP, gradients are synchronised once, on the last micro-batch."""
        while True:
            micro = self.micro_batch or len(labels)
            try:
                optimizer.zero_grad(set_to_none=True)
                loss = 0.0
                parts = list(zip(images.split(micro), labels.split(micro)))
                for i, (part_images, part_labels) in enumerate(parts):
                    last = i == len(parts) - 1
                    with nullcontext() if last or not isinstance(net, DistributedDataParallel) else net.no_sync():
                        with precision.autocast():
                            part = criterion(net(part_images).float(), part_labels) * (len(part_labels) / len(labels))
                        precision.scaler.scale(part).backward()
                    loss += part.item()
                return loss
            except torch.cuda.OutOfMemoryError:
                if micro == 1:
                    raise
                self.micro_batch = micro // 2
                self.oom_events_.append({"batch": len(labels), "micro_batch": self.micro_batch})
                torch.cuda.empty_cache()
