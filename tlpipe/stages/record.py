"""Stage 8 of ``fit``, record (``tlpipe.run.outputs`` writes it): what the fit has saved so far. The
linear classifier before a fine-tune (anytime), the final model with how the budget was spent,
and after SIGTERM or Ctrl+C the summary that says so beside the best model saved by then; with
``--register``, the MLflow model as a registry version (``outputs.record``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tlpipe.progress import announce
from tlpipe.run.outputs import STAGE_TAG, FitResult, FittedModel, record, write_cut_summary
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.stages.train import stand_in
from tlpipe.strategy.plan import Plan, budget_use, overrun


@dataclass(frozen=True)
class Saved:
    """What the fit has recorded so far (rank 0): the data and choice of its records, and the linear
    model saved before a fine-tune; ``chosen`` returns the next ``Saved``. After a cut, the summary
    says so, beside the best model saved by then."""

    ctx: FitContext  # its run open
    prepared: Prepared
    choice: Choice | None = None
    model: FittedModel | None = None  # the model in the bundle, once this run saved one

    @property
    def enabled(self) -> bool:
        return self.ctx.ranks.is_main

    def _record(self, model: FittedModel, **status) -> FitResult:
        ctx, p, choice = self.ctx, self.prepared, self.choice
        status.setdefault("budget", ctx.budget.to_dict())
        return record(ctx.out, ctx.data, p.spec, model, ctx.run, ctx.timings.seconds, choice.assessment, p.ranking,
                      diagnosis=model.diagnosis or choice.diagnosis, **status)

    def chosen(self, prepared: Prepared, choice: Choice) -> Saved:
        """The next ``Saved``: ``prepared`` (the data as diagnose left it, without the label suspects
        when excluded) and ``choice``; before a fine-tune, with its linear classifier as the model to
        save first (``save_first``), unless an earlier run of this fit left a complete one (a re-run
        to add trials: that model stays until a better one). A cut from here on records that model."""
        saved = Saved(self.ctx, prepared, choice)
        if not self.enabled or choice.config.strategy == "linear" or choice.linear is None:
            return saved
        if self.ctx.folder.previous_status() == "complete":
            return saved
        linear, strategy = choice.linear, choice.config.strategy
        decision = stand_in(choice, f"Saved first, while the {strategy} fine-tune runs: the model until it ends.")
        return dataclasses.replace(saved, model=FittedModel(linear.config, prepared.backbone, linear.trained,
                                                            linear.codes["val"], {}, decision))

    def save_first(self) -> None:
        """The linear classifier ``chosen`` picked, as a complete bundle while the fine-tune runs."""
        if self.model is None:
            return
        self._record(self.model, status="provisional")  # a cut waits until it is whole (outputs.record)
        announce(f"[bold]Saved[/] the linear classifier ({self.choice.linear.val_accuracy:.3f} on val) while the "
                 f"fine-tune runs: {self.ctx.folder.bundle}")

    def final(self, prepared: Prepared, choice: Choice, model: FittedModel, plan: Plan, pace: dict) -> FitResult | None:
        """The final record of ``model`` on the data of ``prepared`` (train grown by the extend stage);
        the plan's epoch time beside the one measured, and why a fit that used less than ``USED_SHARE``
        of its limit stopped there."""
        if not self.enabled:
            return None
        budget, seconds = self.ctx.budget, self.ctx.timings.seconds
        budget = {**budget.to_dict(), **budget_use(budget, plan, pace, model.tuning or {}), **overrun(budget, seconds)}
        final = dataclasses.replace(self, prepared=prepared, choice=choice)
        return final._record(model, plan=plan.to_dict(), budget=budget, register=self.ctx.register)

    def cut(self, reason: str) -> FitResult | None:
        """The summary after SIGTERM or Ctrl+C; a fit whose final record was written stays complete."""
        if not self.enabled:
            return None
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
