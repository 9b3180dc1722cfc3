"""``fit``: the stages of a fit, in order, over one ``FitContext`` (``tlpipe.stages``), each timed:

1. ``prepare``: check and split the data, build the backbone (with ``candidates``, the one the
   transfer signals rank best; it travels on in ``config.backbone``);
2. ``choose``: the codes, and under ``strategy: auto`` the policy (``tlpipe.strategy.policy``);
   before a fine-tune, its linear classifier is saved as a complete bundle (anytime: a fit
   stopped from here on leaves a model that predicts);
3. ``plan`` (``stages.planning``, rules in ``tlpipe.strategy.plan``): from speeds measured here, the resolution, epochs, trials
   and pruner that fit the time budget (``budget:``, ``--time-limit``), saved to ``plan.json``;
4. ``train``: the Optuna study, then the final model from its best trial;
5. ``check``: a fine-tune is scored through the prediction path (at its training resolution and
   the native one, the better kept) and, under auto, must beat the tuned linear classifier (the
   guard), else that classifier is the model;
6. ``record`` (``stages.record``; written by ``tlpipe.run.outputs`` into the ``RunFolder``): bundle, reports, MLflow run and model (``tlpipe.bundle.serving``),
   ``summary.json``;
7. ``register`` (with ``register=NAME``): the MLflow model as a registry version, with an alias.

Everything is written under the output folder, never into the dataset folder. SIGTERM or Ctrl+C
raise ``FitCut`` after the summary says what was cut. Under ``torchrun`` every rank runs ``fit``:
all of them train, rank 0 alone writes and logs, and the others return None.
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

from tlpipe.budget import Budget, FitCut, parse_duration, recording_cut, stop_on_signals
from tlpipe.config import FitConfig, load_config
from tlpipe.device import resolve_device
from tlpipe.errors import TlpipeError
from tlpipe.explore import extract, inspect  # noqa: F401 - the API's other entry points, here as before
from tlpipe.run.outputs import FitResult
from tlpipe.progress import quiet_libraries
from tlpipe.run.folder import RunFolder, fit_key
from tlpipe.stages.check import check
from tlpipe.stages.choose import choose
from tlpipe.stages.context import FitContext, TuningOverrides
from tlpipe.stages.planning import plan_training
from tlpipe.stages.prepare import open_run, prepare
from tlpipe.stages.record import Saved
from tlpipe.stages.train import run_worker, train  # noqa: F401 - run_worker: the API's tuning worker
from tlpipe.strategy.plan import trained_pace
from tlpipe.run.store import check_store
from tlpipe.training.distributed import distributed
from tlpipe.utils import write_json

__all__ = ["FitCut", "FitResult", "TuningOverrides", "extract", "fit", "inspect", "run_worker"]


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
        from tlpipe.bundle.serving import check_registry_names

        check_registry_names(register, alias)
    config = config or load_config(recipe)
    budget = Budget(parse_duration(config.budget))
    data = Path(data).expanduser()
    out = Path(output) if output else default_output_dir(data)
    tracking_uri = check_store(tracking_uri)  # a store MLflow cannot use: one line before any work
    try:
        with quiet_libraries(not verbose), stop_on_signals(), distributed(resolve_device(config.device)) as ranks:
            ranks.main_alone(when=config.strategy == "linear")  # nothing to share out: rank 0 fits the head alone
            ctx = FitContext(data, out, ranks, budget, recipe=recipe, tuning=tuning or TuningOverrides())
            with ctx.folder.claim(data, fit_key(data, config), overwrite) if ranks.is_main else nullcontext():
                result = _fit(ctx, config, experiment, tracking_uri)
            if result is not None and register:
                register_stage(result, register, alias)  # after the fit: its release of the output folder
            return result
    except FitCut as cut:
        cut.output = out
        raise


def _fit(ctx: FitContext, config: FitConfig, experiment: str | None, tracking_uri: str) -> FitResult | None:
    """``fit``'s stages, in the output folder it holds."""
    prepared = prepare(ctx, config)
    with open_run(ctx, experiment, tracking_uri) as run:
        ctx = dataclasses.replace(ctx, run=run)
        if ctx.ranks.is_main:
            ctx.folder.keep_run(run.run_id, run.tracking_uri)
        saved = Saved(ctx, prepared)
        try:
            choice = choose(ctx, prepared)
            ctx.ranks.main_alone(when=choice.config.strategy == "linear")
            saved.first(choice)  # anytime: a fine-tune's linear classifier, predict-ready, first
            choice, plan = plan_training(ctx, prepared, choice)
            model = train(ctx, prepared, choice, plan)
            ctx.ranks.main_alone(wait=True)  # training is over: rank 0 goes on alone
            pace = trained_pace(model.trained)  # before the guard may put the linear classifier in its place
            return saved.final(check(ctx, prepared, choice, model), plan, pace)
        except FitCut as cut:
            recording_cut()
            cut.result = saved.cut(cut.reason)
            raise


def register_stage(result: FitResult, name: str, alias: str | None) -> None:
    """The fit's MLflow model as a new version of ``name`` in the registry, ``alias`` moved to it;
    ``summary.json`` says which."""
    from tlpipe.bundle.serving import register_model

    try:
        version = register_model(result.run_id, result.summary["tracking_uri"], name, alias)
        result.summary["registered"] = {"name": name, "version": version, "alias": alias}
    except TlpipeError as exc:  # the fit is whole: its report is still printed, then this
        result.summary["registered"] = {"name": name, "error": str(exc)}
    write_json(result.output_dir / RunFolder.SUMMARY, result.summary)
