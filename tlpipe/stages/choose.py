"""Stage 3 of ``fit``, choose: the codes of the strategy asked for, or under ``strategy: auto`` the
policy's strategy and tap (``tlpipe.strategy.policy``) from one hooked pass that yields both the
codes and the signals; before a fine-tune, its linear classifier (saved first: anytime)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from tlpipe.config import FitConfig
from tlpipe.models import PENULTIMATE, dataset_codes
from tlpipe.progress import announce
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.strategy.auto import Assessment, assess
from tlpipe.strategy.decision import Decision
from tlpipe.strategy.plan import BASELINE_STUDY_SHARE
from tlpipe.strategy.policy import Codes, LinearFit, cached_fit_linear, choose_tap, tuned_baseline
from tlpipe.strategy.signals import collect_splits


def choose(ctx: FitContext, prepared: Prepared) -> Choice:
    """The codes of the strategy asked for; under auto, the policy's strategy and tap, from one
    hooked pass that yields both the codes and the signals. Before a fine-tune (rank 0): the linear
    classifier saved first, tuned under auto as the guard's baseline."""
    config, spec, backbone = prepared.config, prepared.spec, prepared.backbone
    ranks, timings = ctx.ranks, ctx.timings
    cache = Path(config.cache_dir)
    if config.strategy != "auto":
        with timings.stage("extract_codes"):  # under torchrun each rank a shard
            codes = {split: dataset_codes(backbone, spec, split, config, code_tap(config), cache=cache, ranks=ranks)
                     for split in ("train", "val")}
        if config.strategy == "linear" or not ranks.is_main:
            return Choice(config, codes)
        with timings.stage("linear_first"):  # the model a fine-tune stopped early leaves
            linear_config = config.model_copy(update={"strategy": "linear", "layer": PENULTIMATE})
            linear = LinearFit(PENULTIMATE, cached_fit_linear(linear_config, codes), codes, linear_config)
        return Choice(config, codes, linear=linear)
    assessment, codes, linear = _assessed(ctx, prepared)
    config = assessment.apply(config)
    if ranks.is_main:
        announce(_decision_line(assessment.decision, config))
    if linear is not None and config.strategy != "linear":
        with timings.stage("linear_baseline"):
            linear = tuned_baseline(linear, ctx.out, ctx.budget.timeout(share=BASELINE_STUDY_SHARE))
    return Choice(config, codes, assessment, linear)


def _assessed(ctx: FitContext, prepared: Prepared) -> tuple[Assessment, Codes, LinearFit | None]:
    """Under auto: the hooked pass, the decision and (rank 0) the tap's linear classifier. The chosen
    tap's codes come back as arrays of their own and the assessment without the pass's features, so
    every other tap and the ImageNet logits are let go when this returns."""
    config, linear = prepared.config, None
    with ctx.timings.stage("extract_codes"), ctx.ranks.main_first():
        features = collect_splits(prepared.backbone, prepared.spec, config, cache=Path(config.cache_dir))
    with ctx.timings.stage("decide"):
        assessment = assess(features, prepared.spec, config, ctx.tuning.trials)
        if ctx.ranks.is_main:  # the tap is rank 0's business: the others only fine-tune
            assessment, linear = choose_tap(assessment, config)
    layer = assessment.apply(config).layer
    codes = {split: (np.ascontiguousarray(X), y) for split, (X, y) in
             (linear.codes if linear else {s: assessment.codes(s, layer) for s in ("train", "val")}).items()}
    return assessment.settled(), codes, linear and dataclasses.replace(linear, codes=codes)


def code_tap(config: FitConfig) -> str | int:
    """The tap a resolved strategy's codes come from: a fine-tune trains the full head path, so its
    LP-FT probe is on the last features."""
    return config.layer if config.strategy == "linear" else PENULTIMATE


def _decision_line(decision: Decision, config: FitConfig) -> str:
    """What auto chose, said before the study starts (the report at the end has the reasons)."""
    study = "" if decision.finetune_minutes is None else (
        f"; a fine-tuning study here: at most {decision.finetune_minutes:g} min (budget {config.auto.finetune_minutes:g})")
    return f"[bold]Strategy[/] {decision.headline}{study}"
