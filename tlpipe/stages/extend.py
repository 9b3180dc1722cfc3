"""Stage 6b of ``fit``, extend: a linear classifier the time limit fitted on a sample gets the time
the fit has left. The frozen pass goes on over the train images it had not reached, in a stratified
order (every prefix keeps the class proportions), until what is left holds only the refit, the
check and the record; the classifier is refitted with the study's settings on every train code
reached. Val stays as it was: the scores before and after compare on the same images.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from tlpipe.data import stratified_order
from tlpipe.models import dataset_codes
from tlpipe.run.outputs import FittedModel
from tlpipe.stages.choose import code_tap
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.strategy.plan import RECORD_SECONDS
from tlpipe.training.fits import fit_linear

# Worth a refit only when the pass can add at least this share of the train images it has.
MIN_GROWTH = 0.1
# Kept for the check and the record past the refit: the record's own estimate, twice (at 70,000
# images the unknown-image detector and the record took 20 s together).
AFTER_SECONDS = 2 * RECORD_SECONDS


def extend(ctx: FitContext, prepared: Prepared, choice: Choice, model: FittedModel
           ) -> tuple[Prepared, Choice, FittedModel]:
    """With time left after training, a linear classifier on a sample refitted on more of train: the
    Prepared, Choice and model with the train images the pass went on to reach; as they were when the
    fit has every image, the model is no linear classifier on frozen codes, or too little time is left."""
    if choice.config.strategy != "linear" or "train" not in ctx.timings.seconds:  # a linear study's model, on choice.codes
        return prepared, choice, model
    rest, spec = _not_reached(prepared, choice), prepared.spec
    n, fitted, pace = len(spec.splits["train"]), ctx.timings.seconds["train"], ctx.timings.pass_seconds_per_image(spec)
    # past the refit on the images train has now, the record's pass over the test sample and the rest
    spare = max(ctx.budget.left() - fitted - pace * len(spec.splits.get("test", ())) - AFTER_SECONDS, 0.0)
    # an image more costs its pass (at the pace measured so far; 0 when the pass came from the cache)
    # and its share of the refit: the pass covers no more images than leave time for their refit
    reach = int(min(len(rest), spare / max(pace + fitted / n, 1e-9)))
    if reach < MIN_GROWTH * n:
        return prepared, choice, model
    with ctx.timings.stage("extend"):
        more = dataclasses.replace(spec, splits={"train": rest[:reach]})  # cached chunk by chunk, as every pass
        X, y = dataset_codes(model.backbone, more, "train", model.config, code_tap(model.config),
                             cache=Path(model.config.cache_dir), deadline=time.monotonic() + spare - fitted * reach / n)
        if len(y) < MIN_GROWTH * n:  # the pass ran slower than the pace it was planned at
            return prepared, choice, model
        train = tuple(np.concatenate(parts) for parts in zip(choice.codes["train"], (X, y)))
        codes = {**choice.codes, "train": train}
        trained = fit_linear(model.config, codes)
    ctx.run.log_params({"n_train_extended": len(train[1])})  # n_train: the sample the study saw
    return _extended(prepared, choice, model, rest[:len(y)], codes, trained)


def _not_reached(prepared: Prepared, choice: Choice) -> list:
    """The train images the fit has not coded (nor left out as label suspects), in the pass's order."""
    if prepared.whole is None:
        return []
    whole = prepared.whole.splits["train"]
    taken = {*prepared.spec.splits["train"], *(choice.diagnosis.suspects if choice.diagnosis else ())}
    order = stratified_order(prepared.whole.labels("train"), prepared.config.seed)
    return [whole[i] for i in order if whole[i] not in taken]


def _extended(prepared: Prepared, choice: Choice, model: FittedModel, added: list, codes: dict, trained
              ) -> tuple[Prepared, Choice, FittedModel]:
    """The records with train grown by ``added`` (their codes in ``codes``) and the classifier
    ``trained`` on them; the data notes say by how much and what it did on val."""
    spec, whole = prepared.spec, prepared.whole
    train = [*spec.splits["train"], *added]
    before, after = model.trained.val_accuracy, trained.val_accuracy
    note = (f"with the time left after training, the frozen pass went on over {len(added):,} more train images "
            f"(train {len(train):,} of {len(whole.splits['train']):,}): the classifier refitted on them with the "
            f"study's settings scores {after:.3f} on val ({before:.3f} on the sample)")
    spec = dataclasses.replace(spec, splits={**spec.splits, "train": train}, notes=[*spec.notes, note])
    extended = {"images": len(added), "train": len(train), "val_sample": round(before, 4), "val": round(after, 4)}
    trained = dataclasses.replace(trained, details={**trained.details, "extended": extended})
    return (dataclasses.replace(prepared, spec=spec), dataclasses.replace(choice, codes=codes),
            dataclasses.replace(model, trained=trained))
