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
from dataclasses import asdict, dataclass, field

from tlpipe.config import AutoConfig
from tlpipe.models import PENULTIMATE
from tlpipe.strategy.signals import Signals

DEFAULT_THRESHOLDS = AutoConfig()


@dataclass
class Decision:
    strategy: str  # linear, partial or full
    layer: str | int = PENULTIMATE  # linear: the code tap, set by the fit's comparison on validation
    unfreeze_stages: int | None = None  # partial: stages trained
    size: str = ""  # small or large
    similarity: str = ""  # near or far
    finetune_minutes: float | None = None  # worst case of a fine-tuning study on this device
    reasons: list[str] = field(default_factory=list)

    @property
    def explanation(self) -> str:
        return " ".join(self.reasons)

    @property
    def headline(self) -> str:
        """The choice in a few words: ``linear on blocks.6 (small data, far from ImageNet)``."""
        tap = f" on {self.layer}" if self.strategy == "linear" else ""
        return f"{self.strategy}{tap} ({self.size} data, {'far from' if self.similarity == 'far' else 'near'} ImageNet)"

    def to_dict(self) -> dict:
        return {**asdict(self), "explanation": self.explanation, "headline": self.headline}


def _stage_probe(signals: Signals, name: str) -> dict:
    return next(s for s in signals.stages if s["name"] == name)


def decide(signals: Signals, images_per_class: int, thresholds: AutoConfig = DEFAULT_THRESHOLDS,
           finetune_minutes: float | None = None) -> Decision:
    """The strategy for data with ``images_per_class`` in its smallest class and these signals;
    ``finetune_minutes``: the worst case of a fine-tuning study on this device (None: unknown, so
    only the size cuts decide)."""
    confidence = signals.imagenet_confidence.get("mean_max_prob", 1.0)
    far = signals.domain_gap > thresholds.far_gap or confidence < thresholds.far_confidence
    cut = thresholds.far_large_per_class if far else thresholds.large_per_class
    large = images_per_class >= cut
    affordable = finetune_minutes is not None and finetune_minutes <= thresholds.finetune_minutes
    last = signals.penultimate
    reasons = [
        f"The smallest class has {images_per_class} training images ({'at least' if large else 'under'} {cut}"
        f"{' for data far from ImageNet' if far else ''}: {'large' if large else 'small'} for fine-tuning).",
        f"The BatchNorm domain gap is {signals.domain_gap:.3f} nats (far above {thresholds.far_gap:.3f}) and the "
        f"ImageNet head's mean top probability {confidence:.2f} (far below {thresholds.far_confidence:.2f}): "
        f"{'far from' if far else 'near'} ImageNet.",
        f"A linear probe on the last features scores {last['probe_accuracy']:.3f} "
        f"(± {last['probe_sem']:.3f}) in {signals.folds}-fold cross-validation.",
    ]
    if finetune_minutes is not None:
        reasons.append(f"A fine-tuning study here takes at most {finetune_minutes:.1f} min "
                       f"({'within' if affordable else 'over'} the {thresholds.finetune_minutes:g}-min budget).")
    decision = Decision("linear", size="large" if large else "small", similarity="far" if far else "near",
                        finetune_minutes=finetune_minutes)
    if large or affordable:
        why = "Plenty of data" if large else "Little data, but a fine-tuning study is affordable here and often pays"
        if far:
            decision.strategy, action = "full", "fine-tune the whole network (LP-FT)"
        else:
            decision.strategy, decision.unfreeze_stages = "partial", thresholds.partial_stages
            action = f"fine-tune the last {thresholds.partial_stages} stages and the head"
        reasons.append(f"{why}, {'far from' if far else 'near'} ImageNet: {action}.")
    else:
        earlier = ""
        if signals.best_stage != PENULTIMATE:
            earlier = (f", or those of {signals.best_stage} (probe {_stage_probe(signals, signals.best_stage)['probe_accuracy']:.3f}; "
                       "earlier features are more generic) if they do better on validation")
        reasons.append(f"Little data {'far from' if far else 'near'} ImageNet: a linear classifier on the frozen "
                       f"network's last features{earlier}.")
    decision.reasons = reasons
    return decision


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy measured on ``n`` images."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(n, 1))


def keep_finetune(finetune_accuracy: float, linear_accuracy: float, n_val: int) -> bool:
    """The guard: fine-tuning stands only if it beats the linear probe by more than the probe's noise."""
    return finetune_accuracy - linear_accuracy > standard_error(linear_accuracy, n_val)
