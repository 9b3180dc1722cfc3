"""The plan: how a fine-tune spends the time the budget leaves, chosen before it starts.

``make_plan`` takes the resolved strategy, the data's counts and image sizes, the speeds measured
on this device (``tlpipe.training.speed``) and the seconds left, and picks the training resolution,
the epochs, the number of trials and the pruner: the largest resolution the images justify at
which the recipe's epochs fit, two trials or more when they can (one when only one can); fewer
epochs only at the smallest resolution; no fine-tune at all when even that does not fit (the
linear model the fit has already saved stands). It also says what the study the data deserves
(the recipe's trials and epochs at the backbone's native resolution) would need, and with which
``--time-limit``. The plan goes to ``plan.json``; a re-run of the same fit continues it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tlpipe.budget import format_duration
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.strategy.decision import Decision

SIZES = (224, 192, 160, 128)  # training resolutions tried below the native one, largest first
MIN_EPOCHS = 3  # fewer than this is not worth a fine-tune: the linear model stands
SAFETY = 0.85  # plan with this share of what is left: speeds measured in seconds drift over minutes
RECORD_SECONDS = 20.0  # the final fit's set-up, the bundle, the reports and the MLflow run, on a CPU
UPSCALE = 1.15  # a source side this much below a resolution gains nothing from it


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
    """One epoch (train, then val) at ``size`` px: the measured speeds scaled by pixels."""
    scale = (size / speeds["size"]) ** 2
    return scale * (n_train / speeds["train_images_per_second"] + n_val / speeds["eval_images_per_second"])


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
    """(size, trials, epochs) in ``available`` seconds: the largest size with two trials (or all the
    recipe's, if fewer), else with one, else the smallest size with fewer epochs; (None, 0, 0)."""
    wanted = min(max(trials, 1), 2)
    for need in (wanted, 1):
        for size in sizes:
            runs = max(trials, 1) if math.isinf(available) else int(available // (epochs * per_epoch[size]))
            if runs >= need:
                return size, (min(runs, trials) if trials else 0), epochs
    fewer = int(available // per_epoch[sizes[-1]])
    if fewer >= MIN_EPOCHS:
        return sizes[-1], min(trials, 1), fewer
    return None, 0, 0


def apply_plan(config: FitConfig, plan: Plan, hyperparameters: dict) -> FitConfig:
    """``config`` as the plan trains it: resolution, epochs, pruner and trial 0's learning rates."""
    if plan.strategy == "linear":
        return config
    finetune = config.finetune.model_copy(update={"image_size": plan.train_size, "epochs": plan.epochs, **hyperparameters})
    tuning = config.tuning.model_copy(update={"pruner": plan.pruner})
    return config.model_copy(update={"finetune": finetune, "tuning": tuning})
