"""Recipes: named YAML presets, overridden by command-line flags, validated before any work starts.

``load_config("quick", batch_size=32)`` reads ``recipes/quick.yaml`` (or a YAML path), applies the
overrides that are not None, and returns a validated ``FitConfig``. Unknown keys and wrong types
are one-line ``TlpipeError``s that name the key and the recipe.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tlpipe.errors import TlpipeError

RECIPES = resources.files("tlpipe") / "recipes"  # the repo's recipes/, linked into the package


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LinearConfig(_Section):
    classifiers: list[Literal["logreg", "svm"]] = Field(default=["logreg", "svm"], min_length=1)
    c_grid: list[float] = Field(default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0], min_length=1)
    cv_folds: int = Field(default=5, ge=2)


class AugmentConfig(_Section):
    """Training-time distortions (the seed notes' list), each sized here; 0 or p=0 turns one off."""

    crop_scale: list[float] = Field(default=[0.35, 1.0], min_length=2, max_length=2)  # RandomResizedCrop area
    hflip: float = Field(default=0.5, ge=0, le=1)  # probability of a horizontal mirror
    vflip: float = Field(default=0.0, ge=0, le=1)  # for data without an up (microscopy, aerial)
    rotate: float = Field(default=15.0, ge=0, le=180)  # degrees, either way
    shear: float = Field(default=8.0, ge=0, le=45)  # degrees, either way
    affine_p: float = Field(default=0.5, ge=0, le=1)  # probability of the rotation + shear
    rgb_shift: int = Field(default=15, ge=0, le=255)  # per-channel shift limit
    color_jitter: float = Field(default=0.2, ge=0, le=1)  # brightness/contrast/saturation strength
    color_p: float = Field(default=0.5, ge=0, le=1)  # probability of each colour transform
    fancy_pca: float = Field(default=0.1, ge=0, le=1)  # PCA colour augmentation alpha (Krizhevsky et al.)

    @property
    def off(self) -> bool:
        """No distortion at all: training sees each image as evaluation does."""
        return (tuple(self.crop_scale) == (1.0, 1.0) and self.hflip == self.vflip == 0
                and (self.affine_p == 0 or self.rotate == self.shear == 0) and (self.color_p == 0 or self.rgb_shift == self.color_jitter == self.fancy_pca == 0))


class FinetuneConfig(_Section):
    """Strategies 2 and 3: partial and full fine-tuning (LP-FT: the head starts from a linear probe)."""

    epochs: int = Field(default=8, ge=1)
    # Unset, both come from the decision (tlpipe.strategy.plan: far data 1e-3 x 0.5, near 1e-4 x 0.3)
    lr: float = Field(default=1e-4, gt=0)  # head learning rate (AdamW); the head starts from the probe
    backbone_lr_mult: float = Field(default=0.3, gt=0, le=1)  # backbone LR = lr x this
    image_size: int | None = Field(default=None, ge=32)  # training resolution; None: the plan's (auto) or the fit's
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    patience: int = Field(default=3, ge=1)  # epochs without a better val accuracy before stopping (in the schedule's second half)
    unfreeze_stages: int = Field(default=2, ge=0)  # partial: how many of the last stages train
    class_weights: Literal["auto", "on", "off"] = "auto"  # auto: on when largest/smallest class > 3
    # Keep every BatchNorm's running statistics: on hymenoptera, updating them from small augmented
    # batches took the LP-FT start from train loss 0.11 to 0.53 and val accuracy down 3-7 points.
    freeze_bn_stats: bool = True
    deterministic: bool = False  # torch deterministic algorithms (exact resume; slower on GPU)


class AutoConfig(_Section):
    """Where ``strategy: auto`` draws its lines (``tlpipe.strategy.decision``); the defaults are
    calibrated by bench/strategy_regret.py on bench/strategy_benchmark.py (see bench/STRATEGY.md)."""

    # Fine-tune (the guard then keeps the linear classifier if that does not pay) when the smallest
    # class has at least large_per_class images, or far_large_per_class for data far from ImageNet,
    # whatever it costs; below that, when a fine-tuning study's worst case (every trial, every epoch)
    # fits in finetune_minutes at the forward speed measured on this device: on a GPU nearly always,
    # on a CPU for small data. 0: never below the size cuts (cost first). See bench/STRATEGY.md: 12 is
    # its calibrated 25 at the forward speed this CPU measures now (46 images/s, 22 when calibrated).
    large_per_class: int = Field(default=150, ge=1)
    far_large_per_class: int = Field(default=50, ge=1)
    finetune_minutes: float = Field(default=12.0, ge=0)
    far_gap: float = Field(default=0.085, ge=0)  # BatchNorm domain gap (nats) above this: far from ImageNet
    far_confidence: float = Field(default=0.5, ge=0, le=1)  # ImageNet head's mean top probability below this: far too
    partial_stages: int = Field(default=2, ge=1)  # stages a partial fine-tune trains, with the head


class TuningConfig(_Section):
    """The Optuna study every fit runs (``tlpipe.tuning``): its size, pruning, storage and search space.
    Each range is widened, if need be, to hold the recipe's own value: that is trial 0."""

    trials: int | None = Field(default=None, ge=0)  # None: 30 for linear, 8 for partial/full; 0: no tuning
    timeout: float | None = Field(default=None, gt=0)  # seconds for the whole study; None: no limit
    pruner: Literal["median", "hyperband", "none"] = "median"  # fine-tuning trials, on val accuracy per epoch
    storage: str | None = None  # an Optuna RDB URL (postgresql://...); None: sqlite:///<output>/optuna.db
    study_name: str | None = None  # None: named from the config, so a re-run continues its own study
    sampler_startup_trials: int = Field(default=5, ge=1)  # TPE: random trials before it models
    pruner_startup_trials: int = Field(default=2, ge=0)  # trials finished before the pruner acts
    pruner_warmup_epochs: int = Field(default=1, ge=0)  # epochs of each trial never pruned
    heartbeat_interval: int = Field(default=60, ge=1)  # seconds; a trial silent for grace_period is
    grace_period: int = Field(default=120, ge=1)  # failed (its process died) and queued again,
    max_retry: int = Field(default=3, ge=0)  # at most this many times
    # Fine-tuning (partial, full); lr, backbone_lr_mult, c: log scale
    lr_range: list[float] = Field(default=[1e-5, 3e-3], min_length=2, max_length=2)
    backbone_lr_mult_range: list[float] = Field(default=[0.03, 1.0], min_length=2, max_length=2)
    weight_decay_range: list[float] = Field(default=[0.0, 0.2], min_length=2, max_length=2)
    unfreeze_stages_range: list[int] = Field(default=[1, 4], min_length=2, max_length=2)  # partial only
    # Linear: classifier and C; None: the recipe's linear.classifiers and the span of linear.c_grid
    classifiers: list[Literal["logreg", "svm"]] | None = Field(default=None, min_length=1)
    c_range: list[float] | None = Field(default=None, min_length=2, max_length=2)

    @field_validator("lr_range", "backbone_lr_mult_range", "weight_decay_range", "unfreeze_stages_range", "c_range")
    @classmethod
    def _span(cls, value: list | None, info: ValidationInfo) -> list | None:
        log = info.field_name in ("lr_range", "backbone_lr_mult_range", "c_range")
        if value is not None and (value[0] > value[1] or value[0] < 0 or (log and value[0] <= 0)):
            raise ValueError(f"must be [low, high] with 0 {'<' if log else '<='} low <= high{' (log scale)' if log else ''}")
        return value


StrategyName = Literal["auto", "linear", "partial", "full"]  # the CLI's --strategy choices too


class FitConfig(_Section):
    backbone: str = "efficientnet_lite0"
    weights: str = "auto"  # "auto", "none", or a path to a weights file
    # auto: chosen from the data's size and its distance from ImageNet (tlpipe.strategy.decision)
    strategy: StrategyName = "auto"
    candidates: list[str] = Field(default_factory=list)  # backbones for auto to rank by transfer signals
    layer: str | int = "penultimate"  # CNN-code tap: "penultimate", a feature_info index or module name
    layer_relu: bool = True  # ReLU earlier-layer taps before pooling
    image_size: int | None = Field(default=None, ge=32)  # None: the backbone's pretrained input size
    batch_size: int = Field(default=64, ge=1)
    num_workers: int | None = Field(default=None, ge=0)  # None: up to 4, by CPU count
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0
    device: str = "auto"
    linear: LinearConfig = Field(default_factory=LinearConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    tuning: TuningConfig = Field(default_factory=TuningConfig)
    auto: AutoConfig = Field(default_factory=AutoConfig)
    cache_dir: str | None = None  # decoded-image cache; None: <output>/cache
    unknown_false_rejection: float = Field(default=0.05, gt=0, lt=1)  # val share the unknown threshold rejects
    exclude_label_issues: bool = False  # leave the train images confident learning flags out of training
    test_time: bool = True  # try flip averaging and a larger test resolution on val (about 3 extra val passes)
    # The whole fit's time limit: 90s, 10m, 1.5h, 2h15m, or none (tlpipe.budget)
    budget: str | float | None = None

    @field_validator("budget")
    @classmethod
    def _duration(cls, value: str | float | None) -> str | float | None:
        from tlpipe.budget import parse_duration

        try:
            parse_duration(value)
        except TlpipeError as exc:
            raise ValueError(str(exc)) from None
        return value


# What each identity of a fit leaves out of the config ("section.key" for a section's key), and why.
# Study: how long and where to search, and the study's own bookkeeping, do not change what a trial
# measures (tuning keeps its *_range keys, classifiers and pruner).
_STUDY_BOOKKEEPING = ("trials", "timeout", "storage", "study_name", "sampler_startup_trials", "pruner_startup_trials",
                      "pruner_warmup_epochs", "heartbeat_interval", "grace_period", "max_retry")
IDENTITY_LEAVES_OUT = {
    # who owns an output folder: a re-run with more time, on another device or with other loader
    # workers is the same fit and continues it
    "fit": ("budget", "device", "num_workers"),
    # what a trial measures: also where the decoded images are cached
    "study": ("budget", "device", "num_workers", "cache_dir", *(f"tuning.{key}" for key in _STUDY_BOOKKEEPING)),
    # the plan: device and loader workers change the speeds it is made from
    "plan": ("budget",),
    # a fine-tune's checkpoint: a re-run with more time, on another device, with other loader workers
    # or another cache folder resumes it (none of them changes the weights an epoch leaves)
    "checkpoint": ("budget", "device", "num_workers", "cache_dir"),
}


def fit_identity(config: FitConfig, scope: str, **inputs: Any) -> str:
    """sha256 of ``config`` less what ``scope`` leaves out (``IDENTITY_LEAVES_OUT``) and of ``inputs``
    (the data, the weights...): equal for two fits that are the same fit in that scope."""
    exclude: dict[str, Any] = {}
    for name in IDENTITY_LEAVES_OUT[scope]:
        section, _, key = name.partition(".")
        if key:
            exclude.setdefault(section, set()).add(key)
        else:
            exclude[section] = True
    what = {"config": config.model_dump(mode="json", exclude=exclude), **inputs}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def available_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in RECIPES.iterdir() if p.name.endswith(".yaml"))


def read_recipe(recipe: str | Path) -> tuple[str, dict[str, Any]]:
    """Return (recipe name, raw values) for a recipe name or a YAML file path."""
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise TlpipeError(f"recipe file not found: {path}")
        text, name = path.read_text(), str(path)
    elif str(recipe) in available_recipes():
        text, name = RECIPES.joinpath(f"{recipe}.yaml").read_text(), str(recipe)
    else:
        raise TlpipeError(f"unknown recipe '{recipe}': use one of {', '.join(available_recipes())} or a YAML file path")
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise TlpipeError(f"recipe {name} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise TlpipeError(f"recipe {name} must be a mapping of keys to values, got {type(values).__name__}")
    return name, values


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value is not None:
            merged[key] = value
    return merged


FLAG_KEYS = {"time_limit": "budget", "workers": "num_workers", "epochs": "finetune.epochs",
             "unfreeze_stages": "finetune.unfreeze_stages"}  # the flags named otherwise than their config keys
_FLAG_OF_KEY = {key: flag for flag, key in FLAG_KEYS.items()}


def _given(loc: tuple, overrides: dict) -> bool:
    """Whether the value at ``loc`` came from ``overrides`` (a flag), not from the recipe."""
    for part in loc:
        if not isinstance(overrides, dict) or overrides.get(part) is None:
            return False
        overrides = overrides[part]
    return True


def _describe(error: dict, source: str, overrides: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if _given(error["loc"], overrides):  # a flag's value: name the flag, not the recipe
        flag = "--" + _FLAG_OF_KEY.get(key, str(error["loc"][-1])).replace("_", "-")
        message = error["msg"].removeprefix("Value error, ")
        return f"{flag}: {message}" if repr(error["input"]) in message else f"{flag} {error['input']!r}: {message}"
    if error["type"] == "extra_forbidden":
        section = FitConfig
        for part in error["loc"][:-1]:
            section = section.model_fields[part].annotation
        close = difflib.get_close_matches(str(error["loc"][-1]), section.model_fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(section.model_fields)})"
        return f"unknown key '{key}' in {source}{hint}"
    return f"'{key}' in {source}: {error['msg']}, got {error['input']!r}"


def load_config(recipe: str | Path = "default", **overrides: Any) -> FitConfig:
    """Validated config from a recipe plus overrides (None values are ignored). Nested sections
    are overridden with dicts, e.g. ``linear={"cv_folds": 3}``."""
    name, values = read_recipe(recipe)
    try:
        return FitConfig.model_validate(_merge(values, overrides))
    except ValidationError as exc:
        raise TlpipeError("; ".join(_describe(e, f"recipe {name}", overrides) for e in exc.errors())) from None


def config_from_flags(recipe: str | Path = "default", **flags: Any) -> FitConfig:
    """The recipe with the command line's flags over it (None: not given), each on its config key
    (``FLAG_KEYS``; the others are named as their keys): one mapping for every command."""
    overrides: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        *sections, key = FLAG_KEYS.get(flag, flag).split(".")
        target = overrides
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value
    return load_config(recipe, **overrides)


def config_to_yaml(config: FitConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
