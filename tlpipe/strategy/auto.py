"""``--strategy auto``: measure the data against the backbone, decide, and say what the fit will cost.

``assess(features, spec, config)`` takes the frozen backbone's one pass over the splits
(``collect_features``: hooks keep every stage's features, so the codes the linear strategy needs
come out of the same pass), computes the transfer signals on the train split, decides, and
estimates the fit's time from the measured forward speed. ``rank_backbones`` does the same for several candidates and
orders them by cross-validated probe accuracy (LogME breaks ties).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec, stratified_subset
from tlpipe.device import resolve_device
from tlpipe.models import PENULTIMATE, Backbone
from tlpipe.strategy.decision import Decision, decide
from tlpipe.strategy.frozen_pass import FeatureSet, collect_features
from tlpipe.strategy.signals import Signals, compute_signals
from tlpipe.tuning.space import requested_trials

MAX_SIGNAL_IMAGES = 2000  # the probes' cost grows with the images; their verdict stops changing well before this
TRAIN_STEP_COST = 3.0  # a training step costs about 3 forward passes (forward + backward, AdamW)


@dataclass(frozen=True)
class Assessment:
    features: dict[str, FeatureSet]  # per split assessed
    signals: Signals
    decision: Decision
    estimate: dict = field(default_factory=dict)

    def apply(self, config: FitConfig) -> FitConfig:
        """``config`` with the decided strategy, code tap and unfrozen stages: what the later stages fit."""
        finetune = config.finetune
        if self.decision.unfreeze_stages is not None:
            finetune = finetune.model_copy(update={"unfreeze_stages": self.decision.unfreeze_stages})
        return config.model_copy(update={"strategy": self.decision.strategy, "layer": self.decision.tap, "finetune": finetune})

    def linear_taps(self) -> list[str]:
        """The taps a linear classifier is fitted on and compared by val accuracy: the last features,
        the earlier stage the probes rank best, and the two side by side (the first wins ties)."""
        best = self.signals.best_stage
        if best == PENULTIMATE or best not in self.features["train"].stages:
            return [PENULTIMATE]
        return [PENULTIMATE, best, f"{PENULTIMATE}+{best}"]

    def codes(self, split: str, layer: str | int) -> tuple[np.ndarray, np.ndarray]:
        """The codes of ``split`` at ``layer`` (penultimate, a stage, or several joined by "+"), from
        the assessment's pass."""
        features = self.features[split]
        parts = [features.codes if name == PENULTIMATE else features.stages[name] for name in str(layer).split("+")]
        return (np.hstack(parts) if len(parts) > 1 else parts[0]), features.labels

    def settled(self) -> "Assessment":
        """The decision's record alone (signals, decision, estimate), without the pass's features: every
        stage's codes and the ImageNet confidences of every image, let go once
        the tap is chosen."""
        return replace(self, features={})

    def to_dict(self) -> dict:
        return {"decision": self.decision.to_dict(), "signals": self.signals.to_dict(), "estimate": self.estimate}


def images_per_class(spec: DatasetSpec) -> int:
    """Training images of the smallest class: what decides whether fine-tuning can pay off."""
    return min(spec.class_counts("train").values())


def assess(features: dict[str, FeatureSet], spec: DatasetSpec, config: FitConfig, trials: int | None = None) -> Assessment:
    """Signals from the train features (``collect_features``), the decision, and the fit's estimated
    cost; ``trials``: the run's study size where it overrides the recipe's (``--trials``)."""
    signals = compute_signals(_subset(features["train"], MAX_SIGNAL_IMAGES, config.seed), seed=config.seed)
    study = finetune_study_seconds(spec, config, features, trials)
    decision = decide(signals, images_per_class(spec), config.auto, finetune_minutes=round(study / 60, 1))
    return Assessment(features, signals, decision, estimate_fit(spec, config, decision, features, study))


def _subset(features: FeatureSet, max_images: int, seed: int) -> FeatureSet:
    """At most ``max_images`` rows, stratified (the signals only; the codes keep every image)."""
    if len(features.labels) <= max_images:
        return features
    rows = stratified_subset(features.labels, max_images, seed)
    return FeatureSet(
        codes=features.codes[rows], stages={k: v[rows] for k, v in features.stages.items()},
        imagenet_confidence=None if features.imagenet_confidence is None else features.imagenet_confidence[rows],
        bn_stats=features.bn_stats, labels=features.labels[rows], indices=features.indices[rows], seconds=features.seconds,
        pytorch_seconds_per_image=features.pytorch_seconds_per_image,
    )


def forward_seconds_per_image(features: dict[str, FeatureSet]) -> float:
    """PyTorch's forward pass time per image, as just measured on this device over every split
    passed (on a few images, the pass's start-up would dominate the train split's own figure): the
    cost unit of training, which ONNX Runtime's faster frozen passes do not change."""
    measured = [f for f in features.values() if f.pytorch_seconds_per_image is not None]
    if not measured:
        return sum(f.seconds for f in features.values()) / max(sum(len(f.labels) for f in features.values()), 1)
    return sum(f.pytorch_seconds_per_image * len(f.labels) for f in measured) / sum(len(f.labels) for f in measured)


def study_seconds(seconds_per_image: float, n_train: int, n_val: int, epochs: int, trials: int) -> float:
    """Worst case of a fine-tuning study: every trial trains every epoch and validates after each
    (pruning and early stopping only shorten it); one training when tuning is off."""
    return max(trials, 1) * epochs * (n_train * TRAIN_STEP_COST + n_val) * seconds_per_image


def finetune_study_seconds(spec: DatasetSpec, config: FitConfig, features: dict[str, FeatureSet],
                           trials: int | None = None) -> float:
    """``study_seconds`` for this data and recipe at the forward speed measured on ``features``."""
    counts = spec.counts()
    trials = requested_trials(config.model_copy(update={"strategy": "full"}), trials)
    return study_seconds(forward_seconds_per_image(features), counts["train"], counts.get("val", 0), config.finetune.epochs,
                         trials)


def estimate_fit(spec: DatasetSpec, config: FitConfig, decision: Decision, features: dict[str, FeatureSet],
                 study: float) -> dict:
    """Seconds the fit will take at most, from the forward speed just measured: the codes, and for
    a fine-tune the study's worst case ``study``."""
    per_image = forward_seconds_per_image(features)
    counts = spec.counts()
    seconds = (counts["train"] + counts.get("val", 0)) * per_image  # codes for the probe (and the linear strategy)
    estimate = {"forward_images_per_second": round(1 / per_image, 1) if per_image else None,
                "finetune_study_minutes": decision.finetune_minutes}
    if decision.strategy != "linear":
        seconds += study
        estimate["epochs"] = config.finetune.epochs
    estimate["fit_seconds"] = round(seconds, 1)
    return estimate


def estimate_training_memory(backbone: Backbone, config: FitConfig) -> dict:
    """Bytes one fine-tuning batch of the recipe's size needs (one probe step on the device)."""
    from tlpipe.training.memory import available_memory, estimate_memory

    device = resolve_device(config.device)
    memory = estimate_memory(backbone.model.to(device), backbone.data_config["input_size"], device)
    batch = memory.largest_batch(available_memory(device), cap=config.batch_size)
    return {"batch_size": batch, "memory_gb": round(memory.for_batch(batch) / 2**30, 2),
            "available_gb": round(available_memory(device) / 2**30, 1)}


def rank_backbones(candidates: list[str], spec: DatasetSpec, config: FitConfig, build) -> list[dict]:
    """Each candidate's signals on (up to ``MAX_SIGNAL_IMAGES`` of) the train split, best first.
    ``build(name)`` returns the Backbone; the ranking is by probe accuracy, then LogME."""
    ranking = []
    for name in candidates:
        start = time.perf_counter()
        backbone = build(name)
        features = collect_features(backbone, spec.splits["train"], config, max_images=MAX_SIGNAL_IMAGES)
        signals = compute_signals(features, seed=config.seed)
        ranking.append({"backbone": name, "probe_accuracy": signals.penultimate["probe_accuracy"],
                        "probe_sem": signals.penultimate["probe_sem"], "logme": signals.penultimate["logme"],
                        "domain_gap": signals.domain_gap, "seconds": round(time.perf_counter() - start, 1)})
    return sorted(ranking, key=lambda r: (-r["probe_accuracy"], -r["logme"]))
