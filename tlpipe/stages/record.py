"""Stage 8 of ``fit``, record (``tlpipe.run.outputs`` writes it): what the fit has saved so far. The
linear classifier before a fine-tune (anytime), the final model with how the budget was spent,
and after SIGTERM or Ctrl+C the summary that says so beside the best model saved by then; with
``--register``, the MLflow model as a registry version."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tlpipe.errors import TlpipeError
from tlpipe.progress import announce
from tlpipe.run.folder import RunFolder
from tlpipe.run.outputs import STAGE_TAG, FitResult, FittedModel, fit_image_hashes, record, write_cut_summary
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.stages.train import stand_in
from tlpipe.strategy.plan import Plan, budget_use, overrun
from tlpipe.utils import write_json


@dataclass
class Saved:
    """What the fit has recorded so far (rank 0): the linear model saved before a fine-tune, and
    the final model; after a cut, the summary says so, beside the best model saved by then."""

    ctx: FitContext  # its run open
    prepared: Prepared
    choice: Choice | None = None
    model: FittedModel | None = None  # the model in the bundle, once this run saved one
    result: FitResult | None = None  # the final record, once written
    fit_images: dict[str, list[str]] | None = None  # the content hashes of train and val, read once

    @property
    def enabled(self) -> bool:
        return self.ctx.ranks.is_main

    def _record(self, model: FittedModel, **status) -> FitResult:
        ctx, p, choice = self.ctx, self.prepared, self.choice
        status.setdefault("budget", ctx.budget.to_dict())
        if self.fit_images is None:  # every file read once, however many records the fit writes
            self.fit_images = fit_image_hashes(p.spec)
        return record(ctx.out, ctx.data, p.spec, model, ctx.run, ctx.timings.seconds, choice.assessment, p.ranking,
                      diagnosis=model.diagnosis or choice.diagnosis, fit_images=self.fit_images, **status)

    def first(self, prepared: Prepared, choice: Choice) -> None:
        """Before a fine-tune, its linear classifier as a complete bundle, unless an earlier run of
        this fit left a complete one (a re-run to add trials: that model stays until a better one).
        ``prepared``: the data as diagnose left it (without the label suspects when excluded)."""
        self.prepared, self.choice, self.fit_images = prepared, choice, None
        if not self.enabled or choice.config.strategy == "linear" or choice.linear is None:
            return
        if self.ctx.folder.previous_status() == "complete":
            return
        linear, strategy = choice.linear, choice.config.strategy
        decision = stand_in(choice, f"Saved first, while the {strategy} fine-tune runs: the model until it ends.")
        self.model = FittedModel(linear.config, self.prepared.backbone, linear.trained, linear.codes["val"], {}, decision)
        self._record(self.model, status="provisional")  # a cut waits until it is whole (outputs.record)
        announce(f"[bold]Saved[/] the linear classifier ({linear.val_accuracy:.3f} on val) while the fine-tune runs: "
                 f"{self.ctx.folder.bundle}")

    def final(self, prepared: Prepared, choice: Choice, model: FittedModel, plan: Plan, pace: dict) -> FitResult | None:
        """The final record of ``model`` on the data of ``prepared`` (train grown by the extend stage);
        the plan's epoch time beside the one measured, and why a fit that used less than ``USED_SHARE``
        of its limit stopped there."""
        if prepared.spec is not self.prepared.spec:
            self.fit_images = None
        self.prepared, self.choice = prepared, choice
        if self.enabled:
            budget, seconds = self.ctx.budget, self.ctx.timings.seconds
            budget = {**budget.to_dict(), **budget_use(budget, plan, pace, model.tuning or {}), **overrun(budget, seconds)}
            self.result = self._record(model, plan=plan.to_dict(), budget=budget)
        return self.result

    def cut(self, reason: str) -> FitResult | None:
        """The summary after SIGTERM or Ctrl+C; a fit whose final record was written stays complete."""
        if not self.enabled or self.result is not None:
            return self.result
        ctx = self.ctx
        ctx.run.log_batch(tags={STAGE_TAG: ctx.timings.cut_in or "between stages"})
        # a stop held until the final record was whole, or one in the steps after it: the fit is complete
        if self.model is None or ctx.folder.previous_status() == "complete":
            bundle = write_cut_summary(ctx.out, reason, ctx.timings.seconds, ctx.run)
            return bundle and FitResult(ctx.out, bundle, ctx.run.run_id, {}, self.prepared.spec, {})
        strategy = self.choice.config.strategy
        why = f"The fit was {reason} before the {strategy} fine-tune ended: the linear classifier saved first stands."
        return self._record(dataclasses.replace(self.model, decision=stand_in(self.choice, why)), status="cut", cut=reason)


def check_registry_names(name: str | None, alias: str | None) -> None:
    """With ``--register NAME``: a name and alias the registry takes, checked before any work."""
    if name:
        from tlpipe.bundle.registry import check_registry_names as check

        check(name, alias)


def registered(result: FitResult, name: str | None, alias: str | None) -> FitResult:
    """With ``name``: the fit's MLflow model as a new version of ``name`` in the registry, ``alias``
    moved to it; the result's ``summary.json`` says which, or why the registry refused."""
    if not name:
        return result
    from tlpipe.bundle.registry import register_model

    try:
        version = register_model(result.run_id, result.summary["tracking_uri"], name, alias)
        outcome = {"name": name, "version": version, "alias": alias}
    except TlpipeError as exc:  # the fit is whole: its report is still printed, then this
        outcome = {"name": name, "error": str(exc)}
    result = dataclasses.replace(result, summary={**result.summary, "registered": outcome})
    write_json(result.output_dir / RunFolder.SUMMARY, result.summary)
    return result
