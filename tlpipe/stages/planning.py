"""Stage 5 of ``fit``, plan: a fine-tune's resolution, epochs, trials and pruner within the time the
budget leaves (``tlpipe.strategy.plan``), from speeds measured on this device now, saved to
``plan.json`` so that a re-run of the same fit continues it."""
from __future__ import annotations

import dataclasses
import time

from tlpipe.config import FitConfig, fit_identity
from tlpipe.data import DatasetSpec, shorter_side
from tlpipe.data.profile import greyscale_share
from tlpipe.device import resolve_device
from tlpipe.models import Backbone
from tlpipe.progress import announce
from tlpipe.run.folder import RunFolder
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.strategy.plan import (
    RECORD_SECONDS, Plan, apply_plan, decision_hyperparameters, epoch_seconds, make_plan, source_augmentation, train_sizes,
)
from tlpipe.training.speed import loader_seconds, measure_speed
from tlpipe.tuning import requested_trials
from tlpipe.utils import default_workers, read_json, write_json
from tlpipe.version import __version__


def plan_training(ctx: FitContext, prepared: Prepared, choice: Choice) -> tuple[Choice, Plan]:
    """A fine-tune's plan within what the budget leaves (``tlpipe.strategy.plan``), saved to
    ``plan.json``; a re-run of the same fit continues the plan it saved. When no fine-tune fits, the
    linear classifier already saved is the model."""
    config, ranks = choice.config, ctx.ranks
    if config.strategy == "linear":
        return choice, Plan("linear")
    with ctx.timings.stage("plan"):  # rank 0 plans, every rank trains that plan
        plan = ranks.broadcast(_saved_or_new_plan(ctx, prepared, config) if ranks.is_main else None)
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


def _saved_or_new_plan(ctx: FitContext, prepared: Prepared, config: FitConfig) -> Plan:
    """The plan ``plan.json`` holds for this very fit (config and data), else a new one from speeds
    measured now (written there)."""
    spec, path, trials = prepared.spec, ctx.out / RunFolder.PLAN, ctx.tuning.trials
    key = fit_identity(config, "plan", tlpipe=__version__, data=spec.identity,
                       trials=trials)
    saved = read_json(path) if path.exists() else None
    if saved and saved.get("key") == key:
        return Plan.from_dict(saved["plan"])
    plan = new_plan(spec, prepared.backbone, config, ctx.budget.left(), trials)
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
