"""Stage 3 of ``fit``, choose: the codes of the strategy asked for, or under ``strategy: auto`` the
policy's strategy and tap (``tlpipe.strategy.policy``) from one hooked pass that yields both the
codes and the signals; before a fine-tune, its linear classifier (saved first: anytime)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from tlpipe.budget import every_image_line, format_duration
from tlpipe.config import FitConfig
from tlpipe.data import stratified_order
from tlpipe.models import PENULTIMATE, dataset_codes
from tlpipe.progress import announce
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.strategy.auto import Assessment, assess
from tlpipe.strategy.decision import Decision
from tlpipe.strategy.plan import BASELINE_STUDY_SHARE, FROZEN_SHARE
from tlpipe.strategy.policy import Codes, LinearFit, cached_fit_linear, choose_tap, tuned_baseline
from tlpipe.strategy.frozen_pass import collect_splits, split_deadlines


def choose(ctx: FitContext, prepared: Prepared) -> tuple[Prepared, Choice]:
    """The codes of the strategy asked for; under auto, the policy's strategy and tap, from one
    hooked pass that yields both the codes and the signals (a pass the time limit stopped leaves a
    stratified sample: the Prepared returned holds the images it reached). Before a fine-tune (rank
    0): the linear classifier saved first, tuned under auto as the guard's baseline."""
    config, ranks, timings = prepared.config, ctx.ranks, ctx.timings
    if config.strategy != "auto":
        with timings.stage("extract_codes"):  # under torchrun each rank a shard
            prepared, codes = _named_codes(ctx, prepared)
        if config.strategy == "linear" or not ranks.is_main:
            return prepared, Choice(config, codes)
        with timings.stage("linear_first"):  # the model a fine-tune stopped early leaves
            linear_config = config.model_copy(update={"strategy": "linear", "layer": PENULTIMATE})
            linear = LinearFit(PENULTIMATE, cached_fit_linear(linear_config, codes), codes, linear_config)
        return prepared, Choice(config, codes, linear=linear)
    prepared, assessment, codes, linear = _assessed(ctx, prepared)
    config = assessment.apply(config)
    if ranks.is_main:
        announce(_decision_line(assessment.decision, config))
    if linear is not None and config.strategy != "linear":
        with timings.stage("linear_baseline"):
            linear = tuned_baseline(linear, ctx.out, prepared.spec.identity, ctx.budget.timeout(share=BASELINE_STUDY_SHARE))
    return prepared, Choice(config, codes, assessment, linear)


def _named_codes(ctx: FitContext, prepared: Prepared) -> tuple[Prepared, Codes]:
    """A named strategy's codes, train and val, within ``FROZEN_SHARE`` of the time left (one process):
    each split goes through in ``stratified_order``, so that a pass the limit stops (it runs slower than
    the sample stage measured) leaves a stratified sample; the Prepared returned holds the images reached."""
    config, spec = prepared.config, prepared.spec
    seconds = None if ctx.ranks.enabled else ctx.budget.timeout(share=FROZEN_SHARE)
    deadlines, start = split_deadlines(spec.counts(), seconds), time.perf_counter()
    codes, rows = {}, {}
    for split in ("train", "val"):
        order = None if seconds is None else stratified_order(spec.labels(split), config.seed)
        ordered = spec if order is None else dataclasses.replace(spec, splits={split: [spec.splits[split][i] for i in order]})
        X, y = dataset_codes(prepared.backbone, ordered, split, config, code_tap(config), cache=Path(config.cache_dir),
                             ranks=ctx.ranks, deadline=deadlines[split])
        if order is not None:  # back to the split's own order, the rows reached
            back = np.argsort(order[:len(y)])
            X, y, rows[split] = X[back], y[back], order[:len(y)][back]
        codes[split] = (X, y)
    return _reached(prepared, rows, time.perf_counter() - start, ctx.budget.limit), codes


def _assessed(ctx: FitContext, prepared: Prepared) -> tuple[Prepared, Assessment, Codes, LinearFit | None]:
    """Under auto: the hooked pass (within ``FROZEN_SHARE`` of the time left), the decision and (rank 0)
    the tap's linear classifier. The chosen tap's codes come back as arrays of their own and the
    assessment without the pass's features, so every other tap and the ImageNet confidences are let go
    when this returns."""
    config, linear = prepared.config, None
    with ctx.timings.stage("extract_codes"), ctx.ranks.main_first():
        features = collect_splits(prepared.backbone, prepared.spec, config, cache=Path(config.cache_dir),
                                  seconds=None if ctx.ranks.enabled else ctx.budget.timeout(share=FROZEN_SHARE))
    prepared = _reached(prepared, {split: f.indices for split, f in features.items()},
                        sum(f.seconds for f in features.values()), ctx.budget.limit)
    with ctx.timings.stage("decide"):
        assessment = assess(features, prepared.spec, config, ctx.tuning.trials)
        if ctx.ranks.is_main:  # the tap is rank 0's business: the others only fine-tune
            assessment, linear = choose_tap(assessment, config)
    layer = assessment.apply(config).layer  # the decision's tap: a fine-tune's LP-FT probe is on the last features
    codes = _own({split: assessment.codes(split, layer) for split in ("train", "val")})
    if linear is not None:
        linear = dataclasses.replace(linear, codes=codes if linear.tap == layer else _own(linear.codes))
    return prepared, assessment.settled(), codes, linear


def _own(codes: Codes) -> Codes:
    """``codes`` as arrays of their own, not views of the pass's array of every tap."""
    return {split: (np.ascontiguousarray(X), y) for split, (X, y) in codes.items()}


def _reached(prepared: Prepared, rows: dict[str, np.ndarray], seconds: float, limit: float | None) -> Prepared:
    """``prepared`` with each split cut to the ``rows`` the pass reached before its deadline (sorted; a
    stratified sample, said in the data notes with what the whole pass would take from the ``seconds``
    it took; ``limit``: the fit's time limit); as it was when the pass went through."""
    spec = prepared.spec
    cut = {split: reached for split, reached in rows.items() if len(reached) < len(spec.splits[split])}
    if not cut:
        return prepared
    splits = {**spec.splits, **{split: [spec.splits[split][i] for i in reached] for split, reached in cut.items()}}
    whole = prepared.whole or spec  # before any cut
    reached = sum(len(r) for r in rows.values())
    total = sum(len(whole.splits[split]) for split in rows)
    more = seconds * (total / reached - 1)
    note = (f"the frozen pass reached {FROZEN_SHARE:.0%} of the time left before its last image and stopped there: "
            "this fit used the stratified sample it had passed ("
            + ", ".join(f"{split} {len(r):,} of {len(spec.splits[split]):,}" for split, r in cut.items())
            + f"); the whole pass would take about {format_duration(more)} more" + every_image_line(limit, reached, total))
    return dataclasses.replace(prepared, spec=dataclasses.replace(spec, splits=splits, notes=[*spec.notes, note]),
                               whole=whole)


def code_tap(config: FitConfig) -> str | int:
    """The tap a resolved strategy's codes come from: a fine-tune trains the full head path, so its
    LP-FT probe is on the last features."""
    return config.layer if config.strategy == "linear" else PENULTIMATE


def _decision_line(decision: Decision, config: FitConfig) -> str:
    """What auto chose, said before the study starts (the report at the end has the reasons)."""
    study = "" if decision.finetune_minutes is None else (
        f"; a fine-tuning study here: at most {decision.finetune_minutes:g} min (budget {config.auto.finetune_minutes:g})")
    return f"[bold]Strategy[/] {decision.headline}{study}"
