"""The automatic choice of transfer strategy: the CS231n 2x2 rule, made measurable.

The notes' rule of thumb crosses dataset size (small/large) with similarity to ImageNet
(similar/different). Here both axes are numbers: size is the images per class of the smallest
class; the data is far from ImageNet when the BatchNorm domain gap of the frozen network is large
(the data's activation statistics against the ones stored in the pretrained network: colour and
texture shifts, ``Signals.domain_gap``) or when the ImageNet head is unsure what it sees (mean top
probability: the content is unlike ImageNet's, as for textures whose pixel statistics are ordinary).
The thresholds are the recipe's ``auto:`` section (``AutoConfig``), calibrated on
``bench/strategy_benchmark.py`` (see ``bench/STRATEGY.md``). The notes' rule held only in part
there: on far data fine-tuning paid from 50 images a class, and on small data of any kind it often
paid too, so a third axis is cost: where a fine-tuning study is cheap on this device (its worst
case within ``finetune_minutes``), small data is fine-tuned as well.

- large (``large_per_class``, or ``far_large_per_class`` when far) or cheap to fine-tune: near,
  a partial fine-tune of the last stages, the rest frozen; far, a full fine-tune (LP-FT);
- otherwise a linear classifier; the fit compares, on validation, the last features, those of the
  earlier stage the probes rank best (more generic: they win on far data) and both side by side,
  and keeps the best (``tlpipe.pipeline``): on the benchmark, always-linear's mean regret 4.9 -> 3.1
  points.

A fine-tuning choice is kept only if it beats that linear classifier by more than its standard
error on validation (``keep_finetune``); otherwise the linear classifier stands.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from tlpipe.config import AutoConfig
from tlpipe.models import PENULTIMATE
from tlpipe.strategy.signals import Signals

DEFAULT_THRESHOLDS = AutoConfig()


@dataclass(frozen=True)
class Decision:
    """What auto chose and why. Each later step of the policy (``tlpipe.strategy.policy``) returns
    a new one with its own reason added, so the reasons read in the order the choices were made."""

    strategy: str  # linear, partial or full
    layer: str | int = PENULTIMATE  # the linear tap, chosen on validation (``policy.choose_tap``)
    unfreeze_stages: int | None = None  # partial: stages trained
    size: str = ""  # small or large
    similarity: str = ""  # near or far
    finetune_minutes: float | None = None  # worst case of a fine-tuning study on this device
    fallback_from: str | None = None  # the fine-tune (partial, full) the guard replaced by this linear classifier
    reasons: tuple[str, ...] = ()

    @property
    def explanation(self) -> str:
        return " ".join(self.reasons)

    @property
    def tap(self) -> str | int:
        """The tap the model's codes come from: a fine-tune trains the full head path."""
        return self.layer if self.strategy == "linear" else PENULTIMATE

    @property
    def headline(self) -> str:
        """The choice in a few words: ``linear on blocks.6 (small data, far from ImageNet)``."""
        tap = f" on {self.layer}" if self.strategy == "linear" else ""
        return f"{self.strategy}{tap} ({self.size} data, {'far from' if self.similarity == 'far' else 'near'} ImageNet)"

    def with_reason(self, reason: str, **changes) -> "Decision":
        """A copy with ``changes`` and ``reason`` added to the reasons."""
        return replace(self, **changes, reasons=(*self.reasons, reason))

    def fall_back(self, reason: str) -> "Decision":
        """Linear on the decision's tap after all (the guard, the plan, the budget), saying why."""
        return self.with_reason(reason, strategy="linear", unfreeze_stages=None, fallback_from=self.strategy)

    def to_dict(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons), "explanation": self.explanation, "headline": self.headline}


def _stage_probe(signals: Signals, name: str) -> dict:
    return next(s for s in signals.stages if s["name"] == name)


def _side(value: float, threshold: float, far_above: bool) -> str:
    """``value`` against its cut, in words computed from the two: "above 0.085: far"."""
    above = value > threshold
    far = above if far_above else value < threshold
    words = ("above" if above else "at or below") if far_above else ("below" if far else "at or above")
    return f"{words} {threshold:.3g}: {'far' if far else 'near'}"


def distance_reason(signals: Signals, thresholds: AutoConfig) -> tuple[bool, str]:
    """Far from ImageNet by the BatchNorm gap or the ImageNet head's confidence, and why in words."""
    gap_far = signals.domain_gap > thresholds.far_gap
    gap = f"The BatchNorm domain gap is {signals.domain_gap:.3f} nats ({_side(signals.domain_gap, thresholds.far_gap, True)})"
    if "mean_max_prob" not in signals.imagenet_confidence:
        return gap_far, f"{gap}; there is no pretrained ImageNet head to ask: {'far from' if gap_far else 'near'} ImageNet."
    confidence = signals.imagenet_confidence["mean_max_prob"]
    far = gap_far or confidence < thresholds.far_confidence
    return far, (f"{gap} and the ImageNet head's mean top probability {confidence:.2f} "
                 f"({_side(confidence, thresholds.far_confidence, False)}): {'far from' if far else 'near'} ImageNet.")


def decide(signals: Signals, images_per_class: int, thresholds: AutoConfig = DEFAULT_THRESHOLDS,
           finetune_minutes: float | None = None) -> Decision:
    """The strategy for data with ``images_per_class`` in its smallest class and these signals;
    ``finetune_minutes``: the worst case of a fine-tuning study on this device (None: unknown, so
    only the size cuts decide)."""
    far, distance = distance_reason(signals, thresholds)
    cut = thresholds.far_large_per_class if far else thresholds.large_per_class
    large = images_per_class >= cut
    # a budget of 0 means cost first: never fine-tune below the size cuts, however quick the study
    affordable = finetune_minutes is not None and 0 < thresholds.finetune_minutes and finetune_minutes <= thresholds.finetune_minutes
    last = signals.penultimate
    reasons = [
        f"The smallest class has {images_per_class} training images ({'at least' if large else 'under'} {cut}"
        f"{' for data far from ImageNet' if far else ''}: {'large' if large else 'small'} for fine-tuning).",
        distance,
        f"A linear probe on the last features scores {'' if signals.score == 'accuracy' else signals.score + ' '}"
        f"{last['probe_accuracy']:.3f} "
        f"(± {last['probe_sem']:.3f}) in {signals.folds}-fold cross-validation.",
    ]
    if finetune_minutes is not None:
        budget = (f"{'within' if affordable else 'over'} the {thresholds.finetune_minutes:g}-min budget"
                  if thresholds.finetune_minutes else "the recipe never fine-tunes small data for being cheap")
        reasons.append(f"A fine-tuning study here takes at most {finetune_minutes:.1f} min ({budget}).")
    strategy, unfreeze = "linear", None
    where = "far from" if far else "near"
    if large or affordable:
        why = "Plenty of data" if large else "Little data, but a fine-tuning study is affordable here and often pays"
        if far:
            strategy, action = "full", "fine-tune the whole network (LP-FT)"
        else:
            strategy, unfreeze = "partial", thresholds.partial_stages
            action = f"fine-tune the last {thresholds.partial_stages} stages and the head"
        reasons.append(f"{why}, {where} ImageNet: {action}.")
    else:
        earlier = ""
        if signals.best_stage != PENULTIMATE:
            earlier = (f", or those of {signals.best_stage} (probe {_stage_probe(signals, signals.best_stage)['probe_accuracy']:.3f}; "
                       "earlier features are more generic) if they do better on validation")
        reasons.append(f"Little data {where} ImageNet: a linear classifier on the frozen network's last features{earlier}.")
    return Decision(strategy, unfreeze_stages=unfreeze, size="large" if large else "small",
                    similarity="far" if far else "near", finetune_minutes=finetune_minutes, reasons=tuple(reasons))


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1))


def keep_finetune(finetune_accuracy: float, linear_accuracy: float, n_val: int) -> bool:
    """The guard: fine-tuning stands only if it beats the linear probe by more than the probe's noise."""
    return finetune_accuracy - linear_accuracy > standard_error(linear_accuracy, n_val)
