"""What the stages of ``fit`` share: one frozen ``FitContext`` made by ``pipeline.fit``, and the
typed records each stage hands the next (``Prepared`` by prepare, ``Choice`` by choose; the model
as ``outputs.FittedModel``). No stage changes a record it was given: it returns a new one."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tlpipe.budget import Budget, FitCut, raise_if_stopped
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.data.source import DataSource
from tlpipe.insight.diagnosis import Diagnosis
from tlpipe.models import Backbone
from tlpipe.run.folder import RunFolder
from tlpipe.strategy.auto import Assessment
from tlpipe.strategy.policy import LinearFit
from tlpipe.run.tracking import FitRun
from tlpipe.training.distributed import DistContext

Codes = dict[str, tuple]


@dataclass
class Timings:
    """Seconds per stage, and the stage a cut stopped: the fit's clock, the one mutable thing the stages share."""

    seconds: dict[str, float] = field(default_factory=dict)
    cut_in: str | None = None  # the innermost stage a cut (SIGTERM, Ctrl+C) stopped: what the run's tag names

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        raise_if_stopped()
        start = time.perf_counter()
        try:
            yield
            raise_if_stopped()
        except FitCut:
            self.cut_in = self.cut_in or name
            raise
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)

    def pass_seconds_per_image(self, spec: DatasetSpec) -> float:
        """The frozen pass's seconds an image so far, over the train and val images of ``spec`` (its
        fixed costs in; the extend stage's refit too)."""
        seconds = self.seconds.get("extract_codes", 0.0) + self.seconds.get("extend", 0.0)
        return seconds / max(1, len(spec.splits["train"]) + len(spec.splits.get("val", ())))


@dataclass(frozen=True)
class TuningOverrides:
    """This run's Optuna settings over the recipe's: None keeps the recipe's value."""

    trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None


@dataclass(frozen=True)
class FitContext:
    """What every stage of one fit reads, made once by ``pipeline.fit``: the data, the output folder
    it holds, this process's ranks under torchrun, the time budget and the stages' clock, the
    recipe's name, this run's tuning overrides, the registry name and alias its model is to get, and,
    once it is open, the fit's MLflow run."""

    data: DataSource  # a ClassFolder or a LabelTable
    out: Path
    ranks: DistContext
    budget: Budget
    timings: Timings = field(default_factory=Timings)
    recipe: str = "default"
    tuning: TuningOverrides = field(default_factory=TuningOverrides)
    register: tuple[str, str | None] | None = None  # --register NAME, --alias
    run: FitRun | None = None

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.out)


@dataclass(frozen=True)
class Prepared:
    """The checked data and the backbone, with the config every later stage reads."""

    spec: DatasetSpec
    config: FitConfig  # backbone: the one built (the ranked winner); cache_dir: resolved
    backbone: Backbone
    ranking: list[dict]
    whole: DatasetSpec | None = None  # the data before the time limit cut it to a sample (sample, choose)

    @property
    def sampled_from(self) -> dict[str, int] | None:
        """Each split's images before the time limit's cut; None when the fit has them all."""
        return self.whole and self.whole.counts()


@dataclass(frozen=True)
class Choice:
    """The strategy to train, and the codes it starts from."""

    config: FitConfig  # strategy and tap resolved
    codes: Codes  # train/val codes at the strategy's tap (a fine-tune's LP-FT probe: the last features)
    assessment: Assessment | None = None  # auto only
    linear: LinearFit | None = None  # the chosen tap's classifier (trial 0 of a linear study, the guard's baseline)
    diagnosis: Diagnosis | None = None  # set by the diagnose stage
