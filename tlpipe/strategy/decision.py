"""The automatic choice of transfer strategy: the CS231n 2x2 rule, made measurable.

The notes' rule of thumb crosses dataset size (small/large) with similarity to ImageNet
(similar/different). Here both axes are numbers: size is the images per class of the smallest
class; the data is far from ImageNet when the BatchNorm domain gap of the frozen network is large
(the data's activation statistics against the ones stored in the pretrained network: colour and
texture shifts, ``Signals.domain_gap``) or when the ImageNet head is unsure what it sees (mean top
probability: the content is unlike ImageNet's, as for textures whose pixel statistics are ordinary).
The thresholds are calibrated on ``bench/strategy_benchmark.py`` (see ``bench/STRATEGY.md``).

- small, near: a linear classifier on the last stage (the codes already separate the classes);
- small, far: a linear classifier, on the earlier stage the probes rank best when it beats the
  last one by more than the probe's standard error (earlier features are more generic);
- large, near: partial fine-tune of the last stages, the rest frozen;
- large, far: full fine-tune (LP-FT).

A fine-tuning choice is kept only if it beats the linear probe by more than the probe's standard
error on validation (``keep_finetune``); otherwise the linear classifier stands.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tlpipe.models import PENULTIMATE
from tlpipe.strategy.signals import Signals


@dataclass(frozen=True)
class Thresholds:
    """Where "small" ends and "far" begins; defaults calibrated by ``bench/strategy_regret.py``."""

    # Set from bench/STRATEGY.md: hymenoptera (121 a class, linear best) stays small, bloodcells
    # (200 a class, full fine-tune 0.88 against 0.61 linear) is large; the two "far" cuts sit between
    # hymenoptera (gap 0.05-0.08, confidence 0.72) and the microscopy, aerial and texture sets.
    large_per_class: int = 150  # smallest class at or above this: enough data to fine-tune
    far_gap: float = 0.085  # BatchNorm domain gap (nats) above this: far from ImageNet
    far_confidence: float = 0.5  # ImageNet head's mean top probability below this: far too
    partial_stages: int = 2  # stages a partial fine-tune trains, with the head


DEFAULT_THRESHOLDS = Thresholds()


@dataclass
class Decision:
    strategy: str  # linear, partial or full
    layer: str | int = PENULTIMATE  # linear: the code tap
    unfreeze_stages: int | None = None  # partial: stages trained
    size: str = ""  # small or large
    similarity: str = ""  # near or far
    reasons: list[str] = field(default_factory=list)

    @property
    def explanation(self) -> str:
        return " ".join(self.reasons)

    def to_dict(self) -> dict:
        return {**asdict(self), "explanation": self.explanation}


def _stage_probe(signals: Signals, name: str) -> dict:
    return next(s for s in signals.stages if s["name"] == name)


def decide(signals: Signals, images_per_class: int, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Decision:
    """The strategy for data with ``images_per_class`` in its smallest class and these signals."""
    large = images_per_class >= thresholds.large_per_class
    confidence = signals.imagenet_confidence.get("mean_max_prob", 1.0)
    far = signals.domain_gap > thresholds.far_gap or confidence < thresholds.far_confidence
    last = signals.penultimate
    reasons = [
        f"The smallest class has {images_per_class} training images ({'at least' if large else 'under'} "
        f"{thresholds.large_per_class}: {'large' if large else 'small'} for fine-tuning).",
        f"The BatchNorm domain gap is {signals.domain_gap:.3f} nats (far above {thresholds.far_gap:.3f}) and the "
        f"ImageNet head's mean top probability {confidence:.2f} (far below {thresholds.far_confidence:.2f}): "
        f"{'far from' if far else 'near'} ImageNet.",
        f"A linear probe on the last features scores {last['probe_accuracy']:.3f} "
        f"(± {last['probe_sem']:.3f}) in {signals.folds}-fold cross-validation.",
    ]
    decision = Decision("linear", size="large" if large else "small", similarity="far" if far else "near")
    if large and far:
        decision.strategy = "full"
        reasons.append("Plenty of data far from ImageNet: fine-tune the whole network (LP-FT).")
    elif large:
        decision.strategy, decision.unfreeze_stages = "partial", thresholds.partial_stages
        reasons.append(f"Plenty of data near ImageNet: fine-tune the last {thresholds.partial_stages} stages and the head.")
    elif far and signals.best_stage != PENULTIMATE:
        best = _stage_probe(signals, signals.best_stage)
        if best["probe_accuracy"] > last["probe_accuracy"] + max(last["probe_sem"], best["probe_sem"]):
            decision.layer = signals.best_stage
            reasons.append(f"Little data far from ImageNet, and the earlier stage {signals.best_stage} probes better "
                           f"({best['probe_accuracy']:.3f}): a linear classifier on its more generic features.")
        else:
            reasons.append("Little data far from ImageNet, but no earlier stage probes clearly better: "
                           "a linear classifier on the last features.")
    else:
        reasons.append("Little data near ImageNet: a linear classifier on the frozen codes, which already fit the task.")
    decision.reasons = reasons
    return decision


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1))


def keep_finetune(finetune_accuracy: float, linear_accuracy: float, n_val: int) -> bool:
    """The guard: fine-tuning stands only if it beats the linear probe by more than the probe's noise."""
    return finetune_accuracy - linear_accuracy > standard_error(linear_accuracy, n_val)
