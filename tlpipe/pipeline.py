"""The Python API behind ``tlpipe fit``, ``inspect``, ``extract`` and tuning workers.

``fit(data, config)`` runs the stages in order, each timed:

1. ``prepare``: check and split the data, build the backbone (with ``candidates``, the one the
   transfer signals rank best; it travels on in ``config.backbone``);
2. ``choose``: the codes, and under ``strategy: auto`` the policy (``tlpipe.strategy.policy``);
   before a fine-tune, its linear classifier is saved as a complete bundle (anytime: a fit
   stopped from here on leaves a model that predicts);
3. ``plan`` (``tlpipe.strategy.plan``): from speeds measured here, the resolution, epochs, trials
   and pruner that fit the time budget (``budget:``, ``--time-limit``), saved to ``plan.json``;
4. ``train``: the Optuna study, then the final model from its best trial;
5. ``check``: a fine-tune is scored through the prediction path (at its training resolution and
   the native one, the better kept) and, under auto, must beat the tuned linear classifier (the
   guard), else that classifier is the model;
6. ``record`` (``tlpipe.outputs``): bundle, reports, MLflow run and model (``tlpipe.serving``),
   ``summary.json``;
7. ``register`` (with ``register=NAME``): the MLflow model as a registry version, with an alias.

Everything is written under the output folder, never into the dataset folder. SIGTERM or Ctrl+C
raise ``FitCut`` after the summary says what was cut. Under ``torchrun`` every rank runs ``fit``:
all of them train, rank 0 alone writes and logs, and the others return None.
"""
from __future__ import annotations

import dataclasses
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np

from tlpipe.budget import Budget, FitCut, parse_duration, raise_if_stopped, recording_cut, stop_on_signals
from tlpipe.cache import cache_key, cache_root
from tlpipe.calibration import calibrate
from tlpipe.config import FitConfig, config_to_yaml, load_config
from tlpipe.data import DatasetSpec, prepare_dataset, shorter_side
from tlpipe.data.profile import greyscale_share
from tlpipe.device import resolve_device
from tlpipe.errors import TlpipeError
from tlpipe.models import PENULTIMATE, Backbone, build_backbone, dataset_codes
from tlpipe.outputs import (
    ASKED_FOR, STAGE_TAG, FitResult, FittedModel, record, write_cut_summary,
)
from tlpipe.progress import announce, quiet_libraries
from tlpipe.run_folder import RunFolder, fit_key
from tlpipe.strategy.auto import Assessment, assess, rank_backbones
from tlpipe.strategy.decision import Decision
from tlpipe.strategy.plan import (
    MIN_EPOCHS, RECORD_SECONDS, Plan, apply_plan, budget_use, overrun, trained_pace, decision_hyperparameters, epoch_seconds, make_plan, source_augmentation, train_sizes,
)
from tlpipe.strategy.policy import LinearFit, cached_fit_linear, choose_tap, guard, tuned_baseline
from tlpipe.strategy.signals import collect_splits
from tlpipe.tracking import FitRun, NoRun, check_store
from tlpipe.training.distributed import DistContext, distributed
from tlpipe.training.frozen import forget_outputs
from tlpipe.training.linear import accuracy
from tlpipe.training.speed import loader_seconds, measure_speed
from tlpipe.training.strategies import DID_NOT_LEARN, DidNotLearn, fit_finetune, fit_linear
from tlpipe.tuning import (
    Tuned, finetune_objective, join_study, linear_objective, requested_trials, run_study, study_summary, trial_allowance,
    tune,
)
from tlpipe.utils import atomic_write, default_workers, read_json, write_json

__all__ = ["FitCut", "FitResult", "TuningOverrides", "extract", "fit", "inspect", "run_worker"]

Codes = dict[str, tuple]


@dataclass
class Timings:
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


@dataclass
class TuningOverrides:
    """This run's Optuna settings over the recipe's: None keeps the recipe's value."""

    trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None


@dataclass
class Prepared:
    """The checked data and the backbone, with the config every later stage reads."""

    data: Path
    out: Path
    spec: DatasetSpec
    config: FitConfig  # backbone: the one built (the ranked winner); cache_dir: resolved
    backbone: Backbone
    ranking: list[dict]
    recipe: str  # its name, for the run's params


@dataclass
class Choice:
    """The strategy to train, and the codes it starts from."""

    config: FitConfig  # strategy and tap resolved
    codes: Codes  # train/val codes at the strategy's tap (a fine-tune's LP-FT probe: the last features)
    assessment: Assessment | None = None  # auto only
    linear: LinearFit | None = None  # the chosen tap's classifier (trial 0 of a linear study, the guard's baseline,
    #                                  the model saved first before a fine-tune)


def default_output_dir(data: Path) -> Path:
    return Path("runs") / f"{data.resolve().name}-{datetime.now():%Y%m%d-%H%M%S}"


def fit(data: str | Path, config: FitConfig | None = None, *, output: str | Path | None = None,
        experiment: str | None = None, tracking_uri: str | None = None, recipe: str = "default",
        tuning: TuningOverrides | None = None, verbose: bool = False, overwrite: bool = False,
        register: str | None = None, alias: str | None = "champion") -> FitResult | None:
    """Fit ``data`` with ``config`` (else the ``recipe``'s), stage by stage, within ``config.budget``;
    see the module docstring. ``tuning`` overrides the recipe's study size and storage for this run
    (``--trials``, ``--storage``...); ``verbose`` lets Optuna's and MLflow's INFO lines through.
    Raises ``FitCut`` on SIGTERM or Ctrl+C, its ``result`` the best model recorded by then. The
    output folder is this fit's alone while it runs; ``overwrite`` lets it replace another fit's.
    ``register``: a registry name for the fit's MLflow model, ``alias`` pointed at the new version
    (a failure is in ``summary["registered"]["error"]``)."""
    if register:
        from tlpipe.serving import check_registry_names

        check_registry_names(register, alias)
    config = config or load_config(recipe)
    budget = Budget(parse_duration(config.budget))
    data = Path(data).expanduser()
    out = Path(output) if output else default_output_dir(data)
    tuning = tuning or TuningOverrides()
    tracking_uri = check_store(tracking_uri)  # a store MLflow cannot use: one line before any work
    try:
        with quiet_libraries(not verbose), stop_on_signals(), distributed(resolve_device(config.device)) as ranks:
            ranks.main_alone(when=config.strategy == "linear")  # nothing to share out: rank 0 fits the head alone
            timings = Timings()
            claim = RunFolder(out).claim(data, fit_key(data, config), overwrite)
            with claim if ranks.is_main else nullcontext():
                result = _fit(data, config, out, ranks, timings, recipe, experiment, tracking_uri, tuning, budget)
            if result is not None and register:
                register_stage(result, register, alias)  # after the fit: its release of the output folder
            return result
    except FitCut as cut:
        cut.output = out
        raise


def register_stage(result: FitResult, name: str, alias: str | None) -> None:
    """The fit's MLflow model as a new version of ``name`` in the registry, ``alias`` moved to it;
    ``summary.json`` says which."""
    from tlpipe.serving import register_model

    try:
        version = register_model(result.run_id, result.summary["tracking_uri"], name, alias)
        result.summary["registered"] = {"name": name, "version": version, "alias": alias}
    except TlpipeError as exc:  # the fit is whole: its report is still printed, then this
        result.summary["registered"] = {"name": name, "error": str(exc)}
    write_json(result.output_dir / RunFolder.SUMMARY, result.summary)


def _fit(data, config, out, ranks, timings, recipe, experiment, tracking_uri, tuning, budget) -> FitResult | None:
    """``fit``'s stages, in the output folder it holds."""
    prepared = prepare(data, config, out, ranks, timings, recipe)
    with _open_run(prepared, experiment, tracking_uri, ranks) as run:
        if ranks.is_main:
            RunFolder(out).keep_run(run.run_id, run.tracking_uri)
        saved = Saved(prepared, run, timings, budget, ranks.is_main)
        try:
            choice = choose(prepared, ranks, timings, budget, tuning.trials)
            ranks.main_alone(when=choice.config.strategy == "linear")
            saved.first(choice)  # anytime: a fine-tune's linear classifier, predict-ready, first
            choice, plan = plan_training(prepared, choice, budget, timings, ranks, tuning.trials)
            model = train(prepared, choice, plan, run, ranks, timings, tuning, budget)
            ranks.main_alone(wait=True)  # training is over: rank 0 goes on alone
            pace = trained_pace(model.trained)  # before the guard may put the linear classifier in its place
            return saved.final(check(prepared, choice, model, timings, budget), plan, pace)
        except FitCut as cut:
            recording_cut()
            cut.result = saved.cut(cut.reason)
            raise


@dataclass
class Saved:
    """What the fit has recorded so far (rank 0): the linear model saved before a fine-tune, and
    the final model; after a cut, the summary says so, beside the best model saved by then."""

    prepared: Prepared
    run: FitRun
    timings: Timings
    budget: Budget
    enabled: bool
    choice: Choice | None = None
    model: FittedModel | None = None  # the model in the bundle, once this run saved one
    result: FitResult | None = None  # the final record, once written

    def _record(self, model: FittedModel, **status) -> FitResult:
        p, choice = self.prepared, self.choice
        status.setdefault("budget", self.budget.to_dict())
        return record(p.out, p.data, p.spec, model, self.run, self.timings.seconds, choice.assessment, p.ranking, **status)

    def first(self, choice: Choice) -> None:
        """Before a fine-tune, its linear classifier as a complete bundle, unless an earlier run of
        this fit left a complete one (a re-run to add trials: that model stays until a better one)."""
        self.choice = choice
        if not self.enabled or choice.config.strategy == "linear" or choice.linear is None:
            return
        if RunFolder(self.prepared.out).previous_status() == "complete":
            return
        linear, strategy = choice.linear, choice.config.strategy
        decision = _stand_in(choice, f"Saved first, while the {strategy} fine-tune runs: the model until it ends.")
        self.model = FittedModel(linear.config, self.prepared.backbone, linear.trained, linear.codes["val"], {}, decision)
        self._record(self.model, status="provisional")  # a cut waits until it is whole (outputs.record)
        announce(f"[bold]Saved[/] the linear classifier ({linear.val_accuracy:.3f} on val) while the fine-tune runs: "
                 f"{RunFolder(self.prepared.out).bundle}")

    def final(self, model: FittedModel, plan: Plan, pace: dict) -> FitResult | None:
        """The final record; the plan's epoch time beside the one measured, and why a fit that used
        less than ``USED_SHARE`` of its limit stopped there."""
        if self.enabled:
            budget = {**self.budget.to_dict(), **budget_use(self.budget, plan, pace, model.tuning or {}),
                      **overrun(self.budget, self.timings.seconds)}
            self.result = self._record(model, plan=plan.to_dict(), budget=budget)
        return self.result

    def cut(self, reason: str) -> FitResult | None:
        """The summary after SIGTERM or Ctrl+C; a fit whose final record was written stays complete."""
        if not self.enabled or self.result is not None:
            return self.result
        self.run.log_batch(tags={STAGE_TAG: self.timings.cut_in or "between stages"})
        if self.model is None:
            bundle = write_cut_summary(self.prepared.out, reason, self.timings.seconds, self.run)
            return bundle and FitResult(self.prepared.out, bundle, self.run.run_id, {}, self.prepared.spec, {})
        strategy = self.choice.config.strategy
        why = f"The fit was {reason} before the {strategy} fine-tune ended: the linear classifier saved first stands."
        return self._record(dataclasses.replace(self.model, decision=_stand_in(self.choice, why)), status="cut", cut=reason)


def _stand_in(choice: Choice, why: str) -> Decision:
    """The decision of a linear classifier saved in place of the fine-tune that was chosen or asked
    for: its reasons, then ``why`` (a report never shows the stand-in as the user's choice)."""
    chosen = choice.assessment.decision if choice.assessment else Decision(
        choice.config.strategy, reasons=(f"{choice.config.strategy.capitalize()} {ASKED_FOR}.",))
    return chosen.fall_back(why)


def prepare(data: Path, config: FitConfig, out: Path, ranks: DistContext, timings: Timings,
            recipe: str = "default") -> Prepared:
    """Check and split the data (quarantine report under ``out``) and build the backbone."""
    if ranks.is_main:
        RunFolder(out).restore()  # a fit killed while it replaced its bundle
    with timings.stage("check_data"):
        spec = prepare_dataset(data, config.val_fraction, config.seed, report_dir=out if ranks.is_main else None)
    with timings.stage("load_backbone"):
        backbone, ranking = choose_backbone(config, spec)
    config = config.model_copy(update={"backbone": backbone.name,  # one cache for the fit, its trials and the guard
                                       "cache_dir": str(cache_root(config.cache_dir, out).resolve())})
    if ranks.is_main:
        atomic_write(out / RunFolder.CONFIG, lambda f: f.write(config_to_yaml(config)))
    return Prepared(data, out, spec, config, backbone, ranking, recipe)


def choose_backbone(config: FitConfig, spec: DatasetSpec) -> tuple[Backbone, list[dict]]:
    """The recipe's backbone, or with ``candidates`` under auto the one the transfer signals rank
    best; returns it with the ranking (empty when there was nothing to rank)."""
    if config.strategy != "auto" or len(config.candidates) < 2:
        return build_backbone(config), []
    build = lambda name: build_backbone(config.model_copy(update={"backbone": name}))  # noqa: E731
    ranking = rank_backbones(config.candidates, spec, config, build)
    return build(ranking[0]["backbone"]), ranking


def _open_run(prepared: Prepared, experiment: str | None, tracking_uri: str | None, ranks: DistContext) -> FitRun:
    """The fit's MLflow run (rank 0), in an experiment named after the dataset folder by default."""
    if not ranks.is_main:
        return NoRun()
    experiment = experiment or re.sub(r"[^\w.-]+", "_", prepared.data.resolve().name) or "tlpipe"
    run = FitRun(experiment, tracking_uri, run_name=prepared.out.name)
    run.resume_id = RunFolder(prepared.out).recorded_run(run.tracking_uri)  # a killed run of this fit: continued
    return run


def choose(prepared: Prepared, ranks: DistContext, timings: Timings, budget: Budget, trials: int | None = None) -> Choice:
    """The codes of the strategy asked for; under auto, the policy's strategy and tap, from one
    hooked pass that yields both the codes and the signals. Before a fine-tune (rank 0): the linear
    classifier saved first, tuned under auto as the guard's baseline."""
    config, spec, backbone = prepared.config, prepared.spec, prepared.backbone
    cache = Path(config.cache_dir)
    if config.strategy != "auto":
        with timings.stage("extract_codes"), ranks.main_first():
            codes = {split: dataset_codes(backbone, spec, split, config, code_tap(config), cache=cache)
                     for split in ("train", "val")}
        if config.strategy == "linear" or not ranks.is_main:
            return Choice(config, codes)
        with timings.stage("linear_first"):  # the model a fine-tune stopped early leaves
            linear_config = config.model_copy(update={"strategy": "linear", "layer": PENULTIMATE})
            linear = LinearFit(PENULTIMATE, cached_fit_linear(linear_config, codes), codes, linear_config)
        return Choice(config, codes, linear=linear)
    with timings.stage("extract_codes"), ranks.main_first():
        features = collect_splits(backbone, spec, config, cache=cache)
    linear = None
    with timings.stage("decide"):
        assessment = assess(features, spec, config, trials)
        if ranks.is_main:  # the tap is rank 0's business: the others only fine-tune
            assessment, linear = choose_tap(assessment, config)
    config = assessment.apply(config)
    if ranks.is_main:
        announce(_decision_line(assessment.decision, config))
    codes = {split: assessment.codes(split, config.layer) for split in ("train", "val")}
    if linear is not None and config.strategy != "linear":
        with timings.stage("linear_baseline"):
            linear = tuned_baseline(linear, prepared.out, budget.timeout())
    return Choice(config, codes, assessment, linear)


def plan_training(prepared: Prepared, choice: Choice, budget: Budget, timings: Timings, ranks: DistContext,
                  trials: int | None = None) -> tuple[Choice, Plan]:
    """A fine-tune's plan within what the budget leaves (``tlpipe.strategy.plan``), saved to
    ``plan.json``; a re-run of the same fit continues the plan it saved. When no fine-tune fits, the
    linear classifier already saved is the model."""
    config = choice.config
    if config.strategy == "linear":
        return choice, Plan("linear")
    with timings.stage("plan"):  # rank 0 plans, every rank trains that plan
        plan = ranks.broadcast(_saved_or_new_plan(prepared, config, budget, trials) if ranks.is_main else None)
    if ranks.is_main:
        announce(f"[bold]Plan[/] {plan.line}")
        for note in plan.notes:
            announce(f"[yellow]Note[/] {note}")
    if plan.strategy == "linear":
        ranks.main_alone()  # the linear classifier is rank 0's alone
        assessment = choice.assessment and dataclasses.replace(
            choice.assessment, decision=choice.assessment.decision.fall_back(f"Plan: {plan.notes[-1]}."))
        linear = choice.linear
        return Choice(linear.config, linear.codes, assessment, linear), plan
    decision = choice.assessment.decision if choice.assessment else None
    rates = decision_hyperparameters(decision, config)
    return dataclasses.replace(choice, config=apply_plan(config, plan, rates)), plan


def _saved_or_new_plan(prepared: Prepared, config: FitConfig, budget: Budget, trials: int | None) -> Plan:
    """The plan ``plan.json`` holds for this very fit (config and data), else a new one from speeds
    measured now (written there)."""
    spec, path = prepared.spec, prepared.out / RunFolder.PLAN
    key = cache_key(spec.splits["train"] + spec.splits.get("val", []), config=config.model_dump(mode="json", exclude={"budget"}),
                    trials=trials)
    saved = read_json(path) if path.exists() else None
    if saved and saved.get("key") == key:
        return Plan.from_dict(saved["plan"])
    plan = new_plan(spec, prepared.backbone, config, budget.left(), trials)
    write_json(path, {"key": key, "plan": plan.to_dict()})
    return plan


def new_plan(spec: DatasetSpec, backbone: Backbone, config: FitConfig, left: float, trials: int | None) -> Plan:
    """A fine-tune's plan for ``left`` seconds, from train and eval steps and the loaders' work timed
    on this device now: first at the largest size the data justifies, then again at the size that
    plan chose (scaling by pixels misjudges small sizes: planned 21.1 s an epoch at 128 px from
    224 px, measured 35.5 s), with the augmentation the source images can take, the plan made anew."""
    native = backbone.data_config["input_size"][-1]
    sample = [s.path for s in spec.splits["train"][:: max(1, len(spec.splits["train"]) // 100)]]
    side = shorter_side(sample)
    if "image_size" in config.finetune.model_fields_set and config.finetune.image_size:
        sizes = [config.finetune.image_size]  # the recipe's own
    elif backbone.model.pretrained_cfg.get("fixed_input_size"):
        sizes = [native]  # a ViT's position embeddings, say, hold one size only
    else:
        sizes = train_sizes(native, side)
    trials, n_val, start = requested_trials(config, trials), spec.counts().get("val", 0), time.monotonic()

    def planned(config: FitConfig, size: int) -> Plan:
        speeds = plan_speeds(spec, backbone, config, size)
        reserve = RECORD_SECONDS + 2 * epoch_seconds(speeds, native, 0, n_val)  # val scored at two sizes
        return make_plan(config, spec, speeds, sizes, native, left - (time.monotonic() - start), trials, reserve)

    plan = planned(config, sizes[0])
    if plan.strategy == "linear":
        return plan
    augment, notes = source_augmentation(config.augment, side, plan.train_size, greyscale_share(sample))
    plan = planned(config.model_copy(update={"augment": augment}), plan.train_size)
    changed = augment.model_dump() if augment != config.augment else {}
    return dataclasses.replace(plan, augment=changed, notes=(*plan.notes, *notes))


def plan_speeds(spec: DatasetSpec, backbone: Backbone, config: FitConfig, size: int) -> dict:
    """The model's train and eval steps and the loaders' work per image, at ``size``, on this device."""
    device = resolve_device(config.device)
    unfreeze = config.finetune.unfreeze_stages if config.strategy == "partial" else None
    data_config = backbone.at_size(size).data_config
    return {**measure_speed(backbone.model, size, device, unfreeze),
            **loader_seconds(spec.splits["train"], data_config, config.augment, device, default_workers(config.num_workers))}


def train(prepared: Prepared, choice: Choice, plan: Plan, run: FitRun, ranks: DistContext, timings: Timings,
          overrides: TuningOverrides, budget: Budget) -> FittedModel:
    """The study over the strategy's hyperparameters as planned, then the final model from its best
    trial (a fine-tune resumes that trial's finished checkpoint instead of training again); no
    trial or epoch starts that the budget cannot hold."""
    config, spec, backbone = choice.config, prepared.spec, prepared.backbone
    run.log_params(_params(config, prepared.recipe, backbone, spec))
    if choice.assessment:
        run.log_params(_auto_params(choice.assessment, prepared.ranking))
    if plan.strategy != "linear":
        run.log_params({f"plan_{k}": v for k, v in plan.to_dict().items() if not isinstance(v, (dict, list, tuple))})
    deadline = budget.deadline(reserve=plan.reserve)
    with timings.stage("tune"):
        trial0 = choice.linear.trained.linear_params() if choice.linear and config.strategy == "linear" else None
        objective = strategy_objective(config, backbone, spec, prepared.out, choice.codes, trial0, deadline)
        overrides = dataclasses.replace(overrides, trials=plan.trials) if plan.strategy != "linear" else overrides
        tuned = _tune(config, prepared.out, objective, run, ranks, overrides, budget, plan)
    config = tuned.config
    decision = choice.assessment.decision if choice.assessment else None
    if config.strategy != "linear" and tuned.fit_dir is None and tuned.summary.get("trials"):
        return _no_trial_finished(choice, backbone, tuned)
    with timings.stage("train"):
        if config.strategy == "linear":
            trained = fit_linear(config, choice.codes)
        else:
            try:
                trained = fit_finetune(backbone, spec, config, tuned.fit_dir or prepared.out, choice.codes,
                                       on_epoch=lambda e, m: run.log_metrics(m, step=e), context=ranks, deadline=deadline,
                                       allowance=trial_allowance(None, deadline, config.finetune.epochs))
            except DidNotLearn as failed:
                return _linear_stands(choice, backbone, tuned, _sentence(str(failed)))
            finally:
                forget_outputs()  # the frozen-stage outputs the trials and this fit shared
    return FittedModel(config, backbone, trained, choice.codes["val"], tuned.summary, decision)


def _no_trial_finished(choice: Choice, backbone: Backbone, tuned: Tuned) -> FittedModel:
    """No fine-tuning trial finished: every one did not learn, or the budget ran out first."""
    failures = [why for why in (tuned.summary.get("pruned_reasons") or {}).values() if why.startswith(DID_NOT_LEARN)]
    if failures and len(failures) == tuned.summary.get("pruned", 0) and not tuned.summary.get("waiting"):
        return _linear_stands(choice, backbone, tuned, _sentence(failures[0]))
    return _linear_stands(choice, backbone, tuned,
                          "Budget: no fine-tuning trial finished in the time limit; the linear classifier stands.")


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


def _linear_stands(choice: Choice, backbone: Backbone, tuned: Tuned, reason: str) -> FittedModel:
    """The linear classifier saved before the fine-tune is the model, on ``backbone`` as it was built
    (every trial trained a copy), its decision saying why."""
    linear = choice.linear
    trained = dataclasses.replace(linear.trained, details={**linear.trained.details, "finetune_fallback": reason})
    return FittedModel(linear.config, backbone, trained, linear.codes["val"], tuned.summary, _stand_in(choice, reason))


def check(prepared: Prepared, choice: Choice, model: FittedModel, timings: Timings, budget: Budget) -> FittedModel:
    """The model to save, scored, given its test-time choice and calibrated on val: see ``_kept``,
    ``_test_time`` and ``_calibrated``."""
    model = _kept(prepared, choice, model, timings)
    with timings.stage("test_time"):
        model = _test_time(prepared, model, budget, timings)
    return _calibrated(model)


def _test_time(prepared: Prepared, model: FittedModel, budget: Budget, timings: Timings) -> FittedModel:
    """Test-time choices made on val: flip averaging (a second forward pass per image) and a larger
    test resolution (for a head on globally pooled codes, the seed notes' FC layers run as
    convolutions over a larger image, their scores averaged). One is kept only when it beats the
    plain pass by more than the standard error of the paired difference, the larger gain first;
    none is tried when the time left cannot hold the extra val passes."""
    if not model.config.test_time:
        return _with_details(model, test_time={"choice": "none", "reason": "off in the recipe (test_time: false)"})
    X, y = model.val_codes
    options = _test_time_options(model)
    seconds_per_image = timings.seconds.get("extract_codes", 0.0) / max(1, sum(prepared.spec.counts().values()))
    if budget.left() < 2 * sum(cost for *_, cost in options) * seconds_per_image * len(y):
        return _with_details(model, test_time={"choice": "none", "reason": "no time left for the extra val passes"})
    plain_right = model.trained.head.predict(X) == y
    scored, tried = {}, {}
    for name, backbone, hflip, cost in options:
        start = time.perf_counter()
        codes = dataset_codes(backbone, prepared.spec, "val", model.config, code_tap(model.config),
                              cache=Path(model.config.cache_dir), hflip=hflip)
        difference = (model.trained.head.predict(codes[0]) == y).astype(float) - plain_right
        se = float(difference.std(ddof=1) / np.sqrt(len(y))) if len(y) > 1 else 0.0
        scored[name] = {"val_accuracy": float(plain_right.mean() + difference.mean()), "gain": float(difference.mean()),
                        "standard_error": se, "forward_passes": cost,
                        "images_per_second": round(len(y) / max(time.perf_counter() - start, 1e-9), 1)}
        tried[name] = (backbone, hflip, codes)
    paying = [name for name, row in scored.items() if row["gain"] > max(row["standard_error"], 0)]
    choice = max(paying, key=lambda name: scored[name]["gain"]) if paying else "none"
    report = {"choice": choice, "val_accuracy_plain": float(plain_right.mean()), "options": scored,
              "hflip": choice != "none" and tried[choice][1]}
    model = _with_details(model, test_time=report)
    if choice == "none":
        return model
    backbone, _, codes = tried[choice]
    return dataclasses.replace(model, backbone=backbone, val_codes=codes)


def _test_time_options(model: FittedModel) -> list[tuple[str, Backbone, bool, float]]:
    """(name, backbone at its test resolution, flip averaging, forward passes per image relative to
    the plain one): flip, and the pretrained config's ``test_input_size`` or about 1.15x the side."""
    backbone = model.backbone
    side = backbone.data_config["input_size"][-1]
    test_size = (backbone.model.pretrained_cfg.get("test_input_size") or (3, 0, 0))[-1]
    larger = test_size if test_size > side else int(round(side * 1.15 / 32) * 32)
    return [("hflip", backbone, True, 2.0), (f"{larger} px", backbone.at_size(larger), False, (larger / side) ** 2)]


def _with_details(model: FittedModel, **details) -> FittedModel:
    return dataclasses.replace(model, trained=dataclasses.replace(model.trained, details={**model.trained.details, **details}))


def _calibrated(model: FittedModel) -> FittedModel:
    """The head with its temperature fitted on the val logits (kept only if the val NLL improves)."""
    head, report = calibrate(model.trained.head, *model.val_codes)
    model = _with_details(model, calibration=report)
    return dataclasses.replace(model, trained=dataclasses.replace(model.trained, head=head))


def _kept(prepared: Prepared, choice: Choice, model: FittedModel, timings: Timings) -> FittedModel:
    """A fine-tune scored on val through the path prediction takes, at its training resolution and
    at the native one (the better kept: "train small, test large"); under auto, the guard: kept
    only if it beats the tuned linear classifier on the decision's tap, else that classifier (on
    the pretrained weights of the same backbone) is the model."""
    if not model.trained.backbone_trained:
        return model
    with timings.stage("evaluate"):
        model = _best_resolution(prepared, model)
    if choice.assessment is None:
        return model
    baseline, val = choice.linear, model.val_codes
    decision = guard(model.decision, accuracy(model.trained.head, *val), baseline.val_accuracy, len(val[1]))
    if decision.strategy != "linear":
        return dataclasses.replace(model, decision=decision)
    return FittedModel(baseline.config, build_backbone(baseline.config), baseline.trained, baseline.codes["val"],
                       model.tuning, decision)


def _best_resolution(prepared: Prepared, model: FittedModel) -> FittedModel:
    """The fine-tuned model at the resolution that scores best on val, of its training one and the
    backbone's native one (a tie keeps the training one: cheaper to predict)."""
    backbone, native = model.backbone, model.backbone.data_config
    sizes = list(dict.fromkeys([model.config.finetune.image_size or native["input_size"][-1], native["input_size"][-1]]))
    scored = {}
    for size in sizes:
        sized = backbone.at_size(size)
        val = dataset_codes(sized, prepared.spec, "val", model.config, PENULTIMATE)
        scored[size] = (accuracy(model.trained.head, *val), sized, val)
    best = max(sizes, key=lambda size: scored[size][0])  # the first, the training size, wins a tie
    _, sized, val = scored[best]
    model = _with_details(model, val_accuracy_by_size={str(s): round(a, 4) for s, (a, *_) in scored.items()},
                          eval_image_size=best)
    return dataclasses.replace(model, backbone=sized, val_codes=val)


def code_tap(config: FitConfig) -> str | int:
    """The tap a resolved strategy's codes come from: a fine-tune trains the full head path, so its
    LP-FT probe is on the last features."""
    return config.layer if config.strategy == "linear" else PENULTIMATE


def strategy_objective(config: FitConfig, backbone: Backbone, spec: DatasetSpec, out: Path, codes: Codes,
                       linear_defaults: dict | None = None, deadline: float | None = None):
    """The Optuna objective of the (resolved) strategy: linear trials on codes (trial 0
    ``linear_defaults`` when known), or fine-tunes that stop at an epoch boundary by ``deadline``."""
    if config.strategy == "linear":
        return linear_objective(codes, linear_defaults)
    return finetune_objective(backbone, spec, out, codes, deadline)


def _tune(config: FitConfig, out: Path, objective, run: FitRun, ranks: DistContext, overrides: TuningOverrides,
          budget: Budget, plan: Plan) -> Tuned:
    """The study (``tlpipe.tuning``) within the budget, less the plan's reserve for scoring and
    recording; off under torchrun, where every rank would run its own study: tune first, then
    train the best config with DDP."""
    if ranks.enabled:
        return Tuned(config, summary={"trials": 0, "skipped": "under torchrun: tune in a single process or with workers"})
    limits = [budget.timeout(plan.reserve), overrides.timeout, config.tuning.timeout]
    timeout = min((t for t in limits if t is not None), default=None)  # the budget's, the run's and the recipe's
    settings = {**dataclasses.asdict(overrides), "timeout": timeout}
    if plan.strategy == "linear":
        return tune(config, out, objective, parent=run, **settings)
    # a fine-tuning trial fits its epochs to its time: the shortest worth starting has MIN_EPOCHS
    least = min(MIN_EPOCHS, plan.epochs)
    return tune(config, out, objective, parent=run, trial_seconds=least * plan.seconds["epoch"], least_epochs=least,
                **settings)


def _params(config: FitConfig, recipe: str, backbone: Backbone, spec: DatasetSpec) -> dict:
    counts = spec.counts()
    return {
        "recipe": recipe, "strategy": config.strategy, "backbone": backbone.name, "arch": backbone.arch,
        "weights_source": backbone.weights.kind, "weights_location": backbone.weights.location,
        "weights_sha256": backbone.weights.sha256, "layer": config.layer, "layer_relu": config.layer_relu,
        "input_size": backbone.data_config["input_size"][-1], "seed": config.seed,
        "batch_size": config.batch_size, "n_classes": len(spec.classes), "val_from": spec.val_from,
        "quarantined": len(spec.quarantined), **{f"n_{split}": n for split, n in counts.items()},
        "linear_classifiers": ",".join(config.linear.classifiers), "linear_cv_folds": config.linear.cv_folds,
        **({f"finetune_{k}": v for k, v in config.finetune.model_dump().items()} if config.strategy != "linear" else {}),
    }


def _decision_line(decision: Decision, config: FitConfig) -> str:
    """What auto chose, said before the study starts (the report at the end has the reasons)."""
    study = "" if decision.finetune_minutes is None else (
        f"; a fine-tuning study here: at most {decision.finetune_minutes:g} min (budget {config.auto.finetune_minutes:g})")
    return f"[bold]Strategy[/] {decision.headline}{study}"


def _auto_params(assessment: Assessment, ranking: list[dict]) -> dict:
    decision, signals = assessment.decision, assessment.signals
    return {
        "auto_strategy": decision.strategy, "auto_layer": decision.layer, "auto_size": decision.size,
        "auto_similarity": decision.similarity, "auto_domain_gap": round(signals.domain_gap, 4),
        "auto_probe_accuracy": round(signals.penultimate["probe_accuracy"], 4), "auto_best_stage": signals.best_stage,
        "auto_estimated_fit_seconds": assessment.estimate.get("fit_seconds"),
        "auto_finetune_study_minutes": decision.finetune_minutes,
        **({"backbone_ranking": ",".join(r["backbone"] for r in ranking)} if ranking else {}),
    }


def run_worker(data: str | Path, storage: str, study_name: str, output: str | Path) -> dict:
    """A tuning worker: joins the study a lead ``fit`` opened on a shared ``storage``, runs queued
    trials until none is left, and returns the study's counts. The lead alone fits the final model.
    The study holds the lead's resolved config: its backbone (the ranked winner), strategy and tap."""
    if data is None:
        raise TlpipeError("a tuning worker needs the dataset folder the lead fit used")
    study, config = join_study(storage, study_name)
    out = Path(output)
    config = config.model_copy(update={"cache_dir": str(cache_root(None, out).resolve())})  # this machine's own cache
    spec = prepare_dataset(Path(data).expanduser(), config.val_fraction, config.seed, report_dir=None)
    backbone = build_backbone(config)
    codes = {split: dataset_codes(backbone, spec, split, config, code_tap(config), cache=Path(config.cache_dir))
             for split in ("train", "val")}
    with quiet_libraries():
        run_study(study, strategy_objective(config, backbone, spec, out, codes), config, worker=True)
    return study_summary(study)


def inspect(data: str | Path, config: FitConfig | None = None, *, recipe: str = "default") -> dict:
    """What ``tlpipe fit --strategy auto`` would see and do, without training or writing anything:
    the data profile (counts, sizes, greyscale, duplicates, leakage), the transfer signals, the
    decision with its reasons and tap (the same policy steps as the fit's, the guard aside), the
    fit's estimated time (and memory, for a fine-tune) and, for a fine-tune, the plan the fit would
    make within ``config.budget`` (the time inspect has taken counting as the fit's first stages)."""
    from tlpipe.data.profile import profile_dataset
    from tlpipe.strategy.auto import estimate_training_memory

    config = (config or load_config(recipe)).model_copy(update={"strategy": "auto"})
    budget = Budget(parse_duration(config.budget))
    spec = prepare_dataset(Path(data).expanduser(), config.val_fraction, config.seed, report_dir=None)
    profile = profile_dataset(spec)
    backbone, ranking = choose_backbone(config, spec)
    config = config.model_copy(update={"backbone": backbone.name})
    assessment, _ = choose_tap(assess(collect_splits(backbone, spec, config), spec, config), config)
    decision, result = assessment.decision, assessment.to_dict()
    if decision.strategy != "linear":
        result["estimate"] = {**assessment.estimate, **estimate_training_memory(backbone, config)}
        result["plan"] = new_plan(spec, backbone, assessment.apply(config), budget.left(), None).to_dict()
    return {
        "data": str(spec.root), "classes": spec.classes, "splits": spec.counts(), "val_from": spec.val_from,
        "quarantined": [(spec.relative(path), why) for path, why in spec.quarantined],
        "profile": profile.to_dict(), "backbone": backbone.name, "backbone_ranking": ranking,
        "strategy": decision.strategy, "layer": decision.tap, **result,
    }


def extract(data: str | Path, out: str | Path, config: FitConfig | None = None, *, recipe: str = "default",
            overwrite: bool = False) -> Path:
    """Write the CNN codes of every valid image of ``data`` (all splits as found) to ``out``:
    ``.npz`` (see ``tlpipe.codes``) or ``.parquet``, replacing an existing file only with
    ``overwrite``. Files that fail the check are left out and listed, with the reason, in the
    file's metadata."""
    from tlpipe.codes import FORMATS, save_codes
    from tlpipe.paths import output_file

    out = output_file(out, "--out", suffixes=FORMATS, overwrite=overwrite, dataset=data)
    config = config or load_config(recipe)
    spec = prepare_dataset(data, seed=config.seed, hold_out=False, report_dir=None)
    backbone = build_backbone(config)
    parts = {split: dataset_codes(backbone, spec, split, config) for split in spec.splits}
    return save_codes(out, spec, parts, backbone, config)
