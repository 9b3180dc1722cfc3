"""``fit``: the stages of a fit in order, each a module of ``tlpipe.stages`` that reads one frozen
``FitContext`` and returns a typed record for the next (their docstrings say what each does).
SIGTERM or Ctrl+C raise ``FitCut`` once the summary says what was cut. Under ``torchrun`` every rank
trains; rank 0 alone writes and logs, the others return None. The API's other entry points:
``tlpipe.explore`` (inspect, extract) and ``tlpipe.stages.train.run_worker`` (a tuning worker).
"""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

from tlpipe.budget import Budget, FitCut, parse_duration, recording_cut, stop_on_signals
from tlpipe.config import FitConfig, load_config
from tlpipe.device import resolve_device
from tlpipe.examples import fit_data
from tlpipe.progress import quiet_libraries
from tlpipe.run.folder import fit_key
from tlpipe.run.outputs import FitResult
from tlpipe.run.store import check_store
from tlpipe.stages.check import check
from tlpipe.stages.choose import choose
from tlpipe.stages.diagnose import diagnose
from tlpipe.stages.extend import extend
from tlpipe.stages.context import FitContext, TuningOverrides
from tlpipe.stages.planning import plan_training
from tlpipe.stages.prepare import open_run, prepare
from tlpipe.stages.record import Saved, check_registry_names
from tlpipe.stages.sample import sample
from tlpipe.stages.train import train
from tlpipe.strategy.plan import trained_pace
from tlpipe.training.distributed import RankDone, distributed

__all__ = ["FitCut", "FitResult", "TuningOverrides", "fit"]


def fit(data: str | Path | None = None, config: FitConfig | None = None, *, example: str | None = None,
        output: str | Path | None = None, experiment: str | None = None, tracking_uri: str | None = None,
        recipe: str = "default", tuning: TuningOverrides | None = None, verbose: bool = False,
        overwrite: bool = False, register: str | None = None, alias: str | None = "champion") -> FitResult | None:
    """Fit the folder ``data`` (or the embedded ``example``, written into the output folder) with
    ``config`` (else the ``recipe``'s) within ``config.budget``. ``tuning`` overrides the recipe's
    study (``--trials``, ``--storage``...); ``verbose`` lets Optuna's and MLflow's INFO lines through;
    ``overwrite`` lets this fit replace another one's output folder; ``register``: a registry name
    for the fit's MLflow model, ``alias`` moved to the new version (a refusal is in
    ``summary["registered"]["error"]``). Raises ``FitCut`` on SIGTERM or Ctrl+C, its ``result`` the
    best model recorded by then."""
    check_registry_names(register, alias)
    config = config or load_config(recipe)
    data, out = fit_data(data, example, output)
    tracking_uri = check_store(tracking_uri)  # a store MLflow cannot use: one line before any work
    try:
        with quiet_libraries(not verbose), stop_on_signals(), distributed(resolve_device(config.device)) as ranks:
            ranks.main_alone(when=config.strategy == "linear")  # nothing to share out: rank 0 fits the head alone
            ctx = FitContext(data, out, ranks, Budget(parse_duration(config.budget)), recipe=recipe,
                             tuning=tuning or TuningOverrides(), register=register and (register, alias))
            with ctx.folder.claim(data, fit_key(data, config), overwrite) if ranks.is_main else nullcontext():
                return _stages(ctx, config, experiment, tracking_uri)
    except RankDone:
        return None
    except FitCut as cut:
        raise cut.recorded(output=out) from cut


def _stages(ctx: FitContext, config: FitConfig, experiment: str | None, tracking_uri: str) -> FitResult:
    prepared = sample(ctx, prepare(ctx, config))
    with open_run(ctx, experiment, tracking_uri) as run:
        ctx = dataclasses.replace(ctx, run=run)
        if ctx.ranks.is_main:
            ctx.folder.keep_run(run.run_id, run.tracking_uri)
        saved = Saved(ctx, prepared)
        try:
            prepared, choice = diagnose(ctx, *choose(ctx, prepared))
            ctx.ranks.main_alone(when=choice.config.strategy == "linear")
            saved = saved.chosen(prepared, choice)  # a cut from here records a fine-tune's linear classifier
            saved.save_first()  # anytime: that classifier, predict-ready, first
            choice, plan = plan_training(ctx, prepared, choice)
            model = train(ctx, prepared, choice, plan)
            ctx.ranks.main_alone(wait=True)  # training is over: rank 0 goes on alone
            pace = trained_pace(model.trained)  # before the guard may put the linear classifier in its place
            prepared, choice, model = extend(ctx, prepared, choice, model)  # a sample's linear classifier: more images
            return saved.final(prepared, choice, check(ctx, prepared, choice, model), plan, pace)
        except FitCut as cut:
            recording_cut()
            raise cut.recorded(result=saved.cut(cut.reason)) from cut
