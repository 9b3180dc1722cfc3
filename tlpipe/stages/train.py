"""Stage 6 of ``fit``, train: the Optuna study over the strategy's hyperparameters as planned, then
the final model from its best trial (a fine-tune resumes that trial's finished checkpoint); no
trial or epoch starts that the budget cannot hold. A fine-tune that never learned, or found no
time, leaves the linear classifier saved before it, saying why. Also the tuning worker's loop."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tlpipe.cache import cache_root
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec, prepare_dataset
from tlpipe.data.table import LabelTable
from tlpipe.errors import TlpipeError
from tlpipe.models import Backbone, build_backbone, dataset_codes
from tlpipe.run.folder import RunFolder
from tlpipe.run.outputs import ASKED_FOR, FittedModel
from tlpipe.progress import quiet_libraries
from tlpipe.stages.choose import code_tap
from tlpipe.stages.context import Choice, Codes, FitContext, Prepared
from tlpipe.stages.diagnose import without_label_issues
from tlpipe.strategy.auto import Assessment
from tlpipe.strategy.decision import Decision
from tlpipe.strategy.plan import LINEAR_STUDY_SHARE, MIN_EPOCHS, Plan
from tlpipe.training.checkpoint import BEST
from tlpipe.training.frozen import FrozenOutputs
from tlpipe.training.fits import DidNotLearn, fit_finetune, fit_linear
from tlpipe.tuning import (
    Tuned, finetune_objective, join_study, linear_objective, run_study, study_summary, trial_allowance, tune,
)


def train(ctx: FitContext, prepared: Prepared, choice: Choice, plan: Plan) -> FittedModel:
    """The study over the strategy's hyperparameters as planned, then the final model from its best
    trial (a fine-tune resumes that trial's finished checkpoint instead of training again); no
    trial or epoch starts that the budget cannot hold."""
    config, spec, backbone, run = choice.config, prepared.spec, prepared.backbone, ctx.run
    run.log_params(_params(config, ctx.recipe, backbone, spec))
    if choice.assessment:
        run.log_params(_auto_params(choice.assessment, prepared.ranking))
    if plan.strategy != "linear":
        run.log_params({f"plan_{k}": v for k, v in plan.to_dict().items() if not isinstance(v, (dict, list, tuple))})
    deadline, kept = ctx.budget.deadline(reserve=plan.reserve), FrozenOutputs()  # kept: shared by the trials and the final fit
    with ctx.timings.stage("tune"):
        trial0 = choice.linear.trained.linear_params() if choice.linear and config.strategy == "linear" else None
        objective = strategy_objective(config, backbone, spec, ctx.out, choice.codes, trial0, deadline, kept)
        tuned = _tune(ctx, config, objective, plan, spec.identity)
    config = tuned.config
    decision = choice.assessment.decision if choice.assessment else None
    if config.strategy != "linear" and tuned.fit_dir is None and tuned.trials:
        return _no_trial_finished(ctx, choice, backbone, tuned)
    if _retrain_too_late(tuned, plan, deadline):
        return _linear_stands(ctx, choice, backbone, tuned, "Budget: the best trial's weights are not in this output folder "
                              "(another process ran it) and the time left holds no retraining; the linear classifier stands.")
    with ctx.timings.stage("train"):
        if config.strategy == "linear":
            trained = fit_linear(config, choice.codes)
        else:
            try:
                trained = fit_finetune(backbone, spec, config, tuned.fit_dir or ctx.out, choice.codes,
                                       on_epoch=lambda e, m: run.log_metrics(m, step=e), context=ctx.ranks, deadline=deadline,
                                       allowance=trial_allowance(None, deadline, config.finetune.epochs), kept=kept)
            except DidNotLearn as failed:
                return _linear_stands(ctx, choice, backbone, tuned, _sentence(str(failed)))
    return FittedModel(config, trained.backbone or backbone, trained, choice.codes["val"], tuned.summary, decision)


def _retrain_too_late(tuned: Tuned, plan: Plan, deadline: float | None) -> bool:
    """The best trial ran in another process (its weights in that process's output folder): the final
    fit would train it again from the start, which the time left must hold (a planned trial's time)."""
    if tuned.fit_dir is None or deadline is None or any((tuned.fit_dir / RunFolder.CHECKPOINTS).rglob(BEST)):  # a restart's too
        return False
    return deadline - time.monotonic() < plan.seconds.get("trial", 0.0)


def _no_trial_finished(ctx: FitContext, choice: Choice, backbone: Backbone, tuned: Tuned) -> FittedModel:
    """No fine-tuning trial finished: every one did not learn, or the budget ran out first."""
    if tuned.did_not_learn and len(tuned.did_not_learn) == tuned.pruned and not tuned.waiting:
        return _linear_stands(ctx, choice, backbone, tuned, _sentence(tuned.did_not_learn[0]))
    return _linear_stands(ctx, choice, backbone, tuned,
                          "Budget: no fine-tuning trial finished in the time limit; the linear classifier stands.")


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


def _linear_stands(ctx: FitContext, choice: Choice, backbone: Backbone, tuned: Tuned, reason: str) -> FittedModel:
    """The linear classifier saved before the fine-tune is the model, on ``backbone`` as it was built
    (every fine-tune trains a copy), its decision saying why. It is rank 0's alone: under torchrun the
    other ranks leave at the barrier the pipeline's rank 0 meets after training."""
    ctx.ranks.main_alone(when=not ctx.ranks.is_main, wait=True)
    linear = choice.linear
    trained = dataclasses.replace(linear.trained, details={**linear.trained.details, "finetune_fallback": reason})
    return FittedModel(linear.config, backbone, trained, linear.codes["val"], tuned.summary, stand_in(choice, reason))


def stand_in(choice: Choice, why: str) -> Decision:
    """The decision of a linear classifier saved in place of the fine-tune that was chosen or asked
    for: its reasons, then ``why`` (a report never shows the stand-in as the user's choice)."""
    chosen = choice.assessment.decision if choice.assessment else Decision(
        choice.config.strategy, reasons=(f"{choice.config.strategy.capitalize()} {ASKED_FOR}.",))
    return chosen.fall_back(why)


def strategy_objective(config: FitConfig, backbone: Backbone, spec: DatasetSpec, out: Path, codes: Codes,
                       linear_defaults: dict | None = None, deadline: float | None = None, kept: FrozenOutputs | None = None):
    """The Optuna objective of the (resolved) strategy: linear trials on codes (trial 0
    ``linear_defaults`` when known), or fine-tunes that stop at an epoch boundary by ``deadline``
    (their frozen-stage outputs shared in ``kept``)."""
    if config.strategy == "linear":
        return linear_objective(codes, linear_defaults)
    return finetune_objective(backbone, spec, out, codes, deadline, kept)


def _tune(ctx: FitContext, config: FitConfig, objective, plan: Plan, data: str) -> Tuned:
    """The study (``tlpipe.tuning``) of ``data`` (the identity of the images it scores on, as the
    checkpoints and the plan are: a time-limited sample differs run to run, and a trial's score on
    one is no score on another) within the budget, less the plan's reserve for scoring and
    recording; off under torchrun, where every rank would run its own study: tune first, then
    train the best config with DDP."""
    overrides = ctx.tuning if plan.strategy == "linear" else dataclasses.replace(ctx.tuning, trials=plan.trials)
    if ctx.ranks.enabled:
        return Tuned(config, summary={"trials": 0, "skipped": "under torchrun: tune in a single process or with workers"})
    limits = [ctx.budget.timeout(plan.reserve), overrides.timeout, config.tuning.timeout,
              ctx.budget.timeout(share=LINEAR_STUDY_SHARE) if plan.strategy == "linear" else None]
    timeout = min((t for t in limits if t is not None), default=None)  # the budget's, the run's and the recipe's
    settings = {**dataclasses.asdict(overrides), "timeout": timeout, "data": data}
    if plan.strategy == "linear":
        return tune(config, ctx.out, objective, parent=ctx.run, **settings)
    # a fine-tuning trial fits its epochs to its time: the shortest worth starting has MIN_EPOCHS
    least = min(MIN_EPOCHS, plan.epochs)
    return tune(config, ctx.out, objective, parent=ctx.run, trial_seconds=least * plan.seconds["epoch"], least_epochs=least,
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


def run_worker(data: str | Path | LabelTable, storage: str, study_name: str, output: str | Path) -> dict:
    """A tuning worker: joins the study a lead ``fit`` opened on a shared ``storage``, runs queued
    trials until none is left, and returns the study's counts. The lead alone fits the final model.
    The study holds the lead's resolved config: its backbone (the ranked winner), strategy and tap."""
    if data is None:
        raise TlpipeError("a tuning worker needs the dataset folder the lead fit used")
    study, config = join_study(storage, study_name)
    out = Path(output)
    config = config.model_copy(update={"cache_dir": str(cache_root(None, out).resolve())})  # this machine's own cache
    spec = prepare_dataset(data, config.val_fraction, config.seed, report_dir=None)
    backbone = build_backbone(config)
    codes = {split: dataset_codes(backbone, spec, split, config, code_tap(config), cache=Path(config.cache_dir))
             for split in ("train", "val")}
    spec, codes = without_label_issues(spec, codes, config)  # as the lead's diagnose left its train
    with quiet_libraries():
        run_study(study, strategy_objective(config, backbone, spec, out, codes), config, worker=True)
    return study_summary(study)
