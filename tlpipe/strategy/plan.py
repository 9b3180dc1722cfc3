"""The plan: how a fine-tune spends the time the budget leaves, chosen before it starts.

``make_plan`` takes the resolved strategy, the data's counts and image sizes, the speeds measured
on this device (``tlpipe.training.speed``) and the seconds left, and picks the training resolution,
the epochs, the number of trials and the pruner: the largest resolution the images justify at
which one trial of the recipe's epochs fits, as many trials as fit there; fewer epochs only at the
smallest resolution; no fine-tune at all when even that does not fit (the
linear model the fit has already saved stands). It also says what the study the data deserves
(the recipe's trials and epochs at the backbone's native resolution) would need, and with which
``--time-limit``. The plan goes to ``plan.json``; a re-run of the same fit continues it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from tlpipe.budget import Budget, format_duration
from tlpipe.config import AugmentConfig, FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.strategy.decision import Decision

SIZES = (224, 192, 160, 128)  # training resolutions tried below the native one, largest first
MIN_EPOCHS = 3  # fewer than this is not worth a fine-tune: the linear model stands
SAFETY = 0.85  # plan with this share of what is left: speeds measured in seconds drift over minutes
# A study of linear classifiers takes at most this share of the time left: each trial, and the final
# fit, scoring and recording after the study, cost time in proportion to the images.
LINEAR_STUDY_SHARE = 0.5
# The frozen pass (every image decoded and run through the backbone once) takes at most this share of
# the time left: the sample stage sizes it so, and the pass stops there if it runs slower than measured.
FROZEN_SHARE = 0.4
# The guard's baseline (a linear study before a fine-tune) takes at most this share: the fine-tune
# it guards needs the rest.
BASELINE_STUDY_SHARE = 0.15
RECORD_SECONDS = 20.0  # the final fit's set-up, the bundle, the reports and the MLflow run, on a CPU
UPSCALE = 1.15  # a source side this much below a resolution gains nothing from it
GREY_SHARE = 0.9  # data this grey gets no colour distortion (source_augmentation)
LOW_RESOLUTION = 2.0  # sources upscaled this much or more get milder crops and no rotation or shear
LOW_RESOLUTION_CROP = 0.8
USED_SHARE = 0.9  # a fit that ends before this share of its time limit says why
OVERRUN_SHARE = 1.05  # a fit that ends past this share of its time limit (and a second) says it could not keep it
FIRST_STAGES = ("check_data", "load_backbone", "extract_codes", "decide")  # before any model, whatever the limit


@dataclass(frozen=True)
class Plan:
    strategy: str
    train_size: int | None = None  # fine-tunes: the training resolution
    eval_sizes: tuple[int, ...] = ()  # scored on val after training; the better is saved
    epochs: int = 0
    trials: int = 0
    pruner: str = "none"
    seconds: dict = field(default_factory=dict)  # epoch, trial, study, reserve, left at planning
    speeds: dict = field(default_factory=dict)  # as measured (tlpipe.training.speed)
    deserved: dict = field(default_factory=dict)  # the recipe's whole study: seconds, limit, fits
    notes: tuple[str, ...] = ()
    augment: dict = field(default_factory=dict)  # the fine-tune's augmentation (source_augmentation); {}: the recipe's

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Plan":
        return cls(**{**values, "eval_sizes": tuple(values["eval_sizes"]), "notes": tuple(values["notes"])})

    @property
    def reserve(self) -> float:
        """Seconds the study leaves for the final fit, scoring and recording."""
        return self.seconds.get("reserve", RECORD_SECONDS)

    @property
    def line(self) -> str:
        """The plan in one sentence, printed before training."""
        if self.strategy == "linear":
            return "linear classifier only" + (f": {self.notes[-1]}" if self.notes else "")
        size = f"{self.train_size} px" + (f" (scored at {' and '.join(map(str, self.eval_sizes))} px)"
                                          if len(self.eval_sizes) > 1 else "")
        study = f"{self.trials} trial{'s' if self.trials != 1 else ''} x {self.epochs} epochs"
        cost = f"about {format_duration(self.seconds['study'])}"
        left = self.seconds.get("left")
        return f"{self.strategy} fine-tune at {size}, {study}, {cost}" + (
            f" of the {format_duration(left)} left" if left is not None and math.isfinite(left) else "")


def train_sizes(native: int, side: int) -> list[int]:
    """Resolutions to train at, largest first: the native one (or the smallest that holds the
    images' own detail, when they are smaller), then the smaller standard ones."""
    candidates = [native] + [s for s in SIZES if s < native]
    top = native if not side else max((s for s in candidates if s <= side * UPSCALE), default=candidates[-1])
    return [s for s in candidates if s <= top]


def decision_hyperparameters(decision: Decision | None, config: FitConfig) -> dict:
    """Trial 0's learning rates from the decision, where the recipe does not set them: data far from
    ImageNet, whose features must move further, 1e-3 x 0.5; near data 1e-4 x 0.3. Calibrated on
    bench/results/strategy_benchmark.jsonl (bench/BUDGET.md)."""
    if decision is None or {"lr", "backbone_lr_mult"} & config.finetune.model_fields_set:
        return {}
    return {"lr": 1e-3, "backbone_lr_mult": 0.5} if decision.similarity == "far" else {"lr": 1e-4, "backbone_lr_mult": 0.3}


def epoch_seconds(speeds: dict, size: int, n_train: int, n_val: int) -> float:
    """One epoch (train, then val) at ``size`` px: the model's steps and the loaders' work per image
    (``tlpipe.training.speed``), added on a CPU, whose cores do both, the slower of the two where
    the device overlaps them; both measured at ``speeds["size"]`` and scaled by pixels."""
    combine = max if speeds.get("loader_overlaps") else (lambda a, b: a + b)
    train = combine(1 / speeds["train_images_per_second"], speeds.get("loader_train_seconds_per_image", 0.0))
    val = combine(1 / speeds["eval_images_per_second"], speeds.get("loader_eval_seconds_per_image", 0.0))
    return (size / speeds["size"]) ** 2 * (n_train * train + n_val * val)


def make_plan(config: FitConfig, spec: DatasetSpec, speeds: dict, sizes: list[int], native: int, left: float,
              trials: int, reserve: float) -> Plan:
    """The plan for ``config.strategy`` (partial or full) in ``left`` seconds, ``reserve`` of them
    kept for scoring and recording, training at one of ``sizes`` (largest first; ``train_sizes``);
    ``trials``: the study the recipe asks for."""
    counts = spec.counts()
    n_train, n_val, epochs = counts["train"], counts.get("val", 0), config.finetune.epochs
    per_epoch = {s: epoch_seconds(speeds, s, n_train, n_val) for s in sizes}
    available = (left - reserve) * SAFETY
    deserved = max(trials, 1) * epochs * epoch_seconds(speeds, native, n_train, n_val)
    need = {"seconds": round(deserved + reserve, 1), "fits": deserved <= available}
    need["time_limit"] = format_duration(math.ceil((deserved / SAFETY + reserve) / 300) * 300)
    notes = [] if need["fits"] else [f"the study the data deserves ({max(trials, 1)} trials x {epochs} epochs at "
                                      f"{native} px) needs about {format_duration(deserved)} more: "
                                      f"--time-limit {need['time_limit']} or more would give it"]
    size, runs, epochs = _fit_in(sizes, per_epoch, available, trials, epochs)
    if size is None:
        notes.append(f"no fine-tune fits the {format_duration(max(left, 0))} left (one epoch at {sizes[-1]} px: "
                     f"about {format_duration(per_epoch[sizes[-1]])}); the linear classifier stands")
        return Plan("linear", speeds=speeds, deserved=need, notes=tuple(notes),
                    seconds={"left": _finite(left), "epoch": round(per_epoch[sizes[-1]], 1)})
    pruner = config.tuning.pruner if runs >= 3 else "none"  # the pruner needs finished trials to compare with
    study = max(runs, 1) * epochs * per_epoch[size]
    return Plan(config.strategy, size, tuple(dict.fromkeys([size, native])), epochs, runs, pruner,
                {"epoch": round(per_epoch[size], 1), "trial": round(epochs * per_epoch[size], 1), "study": round(study, 1),
                 "reserve": round(reserve, 1), "left": _finite(left)}, speeds, need, tuple(notes))


def _finite(seconds: float) -> float | None:
    return round(seconds, 1) if math.isfinite(seconds) else None  # JSON has no infinity


def _fit_in(sizes: list[int], per_epoch: dict, available: float, trials: int, epochs: int):
    """(size, trials, epochs) in ``available`` seconds: the largest size at which one trial of the
    recipe's epochs fits, with as many trials as fit there (up to the recipe's), else the smallest
    size with fewer epochs; (None, 0, 0). Resolution comes before a second trial: trial 0 already
    has the decision's settings and the guard stands behind it, while fewer pixels cost every trial
    (bench/BUDGET.md: bloodcells at 10 min, two trials at 160 px scored as one did; the dtd10 mosaics
    at 10 min, one trial at 192 px 0.879 val mAP against two at 128 px 0.856)."""
    for size in sizes:
        runs = max(trials, 1) if math.isinf(available) else int(available // (epochs * per_epoch[size]))
        if runs >= 1:
            return size, (min(runs, trials) if trials else 0), epochs
    fewer = int(available // per_epoch[sizes[-1]])
    if fewer >= MIN_EPOCHS:
        return sizes[-1], min(trials, 1), fewer
    return None, 0, 0


def source_augmentation(augment: AugmentConfig, side: int, size: int, grey_share: float) -> tuple[AugmentConfig, list[str]]:
    """The recipe's augmentation less what the source images cannot take, and a note for each change.
    Grey images get no colour distortion: it paints colours the data never has, a shift the model
    must then learn away. Images upscaled ``LOW_RESOLUTION`` times or more to the training size get
    a crop of at least ``LOW_RESOLUTION_CROP`` of the image and no rotation or shear: a 35 % crop of
    a 32 px image keeps 19 px of it. On 32 px digits at 128 px, the LP-FT probe's cross-entropy on
    the recipe's distorted train images was 5.6 (0.03 undistorted; chance 2.3), 5.1 without the
    colour changes, 0.85 without all three; the first fine-tuning epoch's loss fell from 2.2 to 1.0
    and val accuracy after two epochs rose from 0.84 to 0.92 (bench/BUDGET.md)."""
    changes, notes = {}, []
    if grey_share >= GREY_SHARE and augment.color_p > 0:
        changes["color_p"] = 0.0
        notes.append(f"{grey_share:.0%} of the images are grey: no colour distortion in the fine-tune's augmentation")
    if side and side * LOW_RESOLUTION <= size and (augment.crop_scale[0] < LOW_RESOLUTION_CROP or augment.affine_p > 0):
        changes.update(crop_scale=[max(augment.crop_scale[0], LOW_RESOLUTION_CROP), 1.0], affine_p=0.0)
        notes.append(f"the images ({side} px) are upscaled {size / side:.1f}x to {size} px: crops of at least "
                     f"{LOW_RESOLUTION_CROP:.0%} of the image and no rotation or shear in the fine-tune's augmentation")
    return augment.model_copy(update=changes), notes


def trained_pace(trained) -> dict:
    """A fine-tune's epochs as they ran (``TrainedHead``): seconds per epoch (median), epochs run
    and fitted to the time, and whether early stopping ended it; {} for a linear head."""
    if not trained.backbone_trained or not trained.history:
        return {}
    return {"epoch_seconds": round(float(np.median([h["epoch_seconds"] for h in trained.history])), 1),
            "epochs_run": trained.epochs_run, "epochs_fitted": trained.epochs_fitted,
            "stopped_early": trained.epochs_run < (trained.epochs_fitted or 0) and not trained.cut_by_deadline}


def budget_use(budget: Budget, plan: Plan, pace: dict, tuning: dict) -> dict:
    """How the fit spent its limit: the plan's seconds per epoch against the measured ones, and,
    when it ended before ``USED_SHARE`` of the limit, why."""
    use = {"epoch_seconds": {"planned": plan.seconds.get("epoch"), "measured": pace.get("epoch_seconds")}} if pace else {}
    if budget.limit is None or budget.elapsed() >= USED_SHARE * budget.limit:
        return use
    if plan.strategy == "linear":
        why = "the model is a linear classifier on frozen codes: it needs no more time" + (
            f" ({plan.notes[-1]})" if plan.notes and "no fine-tune fits" in plan.notes[-1] else "")
    elif tuning.get("waiting"):
        why = (f"{tuning['waiting']} planned trial(s) did not fit the time left: a trial needs at least "
               f"{min(MIN_EPOCHS, plan.epochs)} epochs, about {format_duration(min(MIN_EPOCHS, plan.epochs) * (pace.get('epoch_seconds') or plan.seconds['epoch']))}")
    elif pace.get("stopped_early"):
        why = (f"all {plan.trials or 1} planned trial(s) ran; the best stopped early at epoch {pace['epochs_run']} of "
               f"{pace['epochs_fitted']}: its val accuracy had stopped improving")
    else:
        why = f"all {plan.trials or 1} planned trial(s) ran all their epochs"
    return {**use, "stopped_early": why}


def overrun(budget: Budget, timings: dict[str, float]) -> dict:
    """When the fit ran past its limit: by how much, and what it spent before any model could be cut short."""
    elapsed = budget.elapsed()
    if budget.limit is None or elapsed <= OVERRUN_SHARE * budget.limit + 1:
        return {}
    first = sum(timings.get(name, 0.0) for name in FIRST_STAGES)
    return {"overran": f"the fit took {format_duration(elapsed)}, over its {format_duration(budget.limit)} limit: checking "
                       f"the data, loading the backbone and one frozen pass over the images come before any model, whatever "
                       f"the limit (here {format_duration(first)}); give --time-limit {format_duration(math.ceil(elapsed))} "
                       "or more to keep it"}


def apply_plan(config: FitConfig, plan: Plan, hyperparameters: dict) -> FitConfig:
    """``config`` as the plan trains it: resolution, epochs, pruner, augmentation and trial 0's learning rates."""
    if plan.strategy == "linear":
        return config
    finetune = config.finetune.model_copy(update={"image_size": plan.train_size, "epochs": plan.epochs, **hyperparameters})
    tuning = config.tuning.model_copy(update={"pruner": plan.pruner})
    augment = config.augment.model_copy(update=plan.augment)
    return config.model_copy(update={"finetune": finetune, "tuning": tuning, "augment": augment})
