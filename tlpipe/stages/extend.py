"""Stage 6b of ``fit``, extend: a linear classifier the time limit fitted on a sample gets the time
the fit has left. The frozen pass goes on over the train images it had not reached, in the same
stratified order (every prefix keeps the class proportions), until what is left holds only the
refit, the check and the record; the classifier is refitted with the study's settings on every
train code reached. Val stays as it was: the scores before and after compare on the same images.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from tlpipe.data import eval_loader, stratified_order
from tlpipe.device import resolve_device
from tlpipe.models import CodeExtractor, extract_codes
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
    if model.config.strategy != "linear" or model.trained.backbone_trained:
        return prepared, choice, model
    rest = _not_reached(prepared, choice)
    n, fitted = len(prepared.spec.splits["train"]), ctx.timings.seconds.get("train", 0.0)
    spare = max(ctx.budget.left() - AFTER_SECONDS - fitted, 0.0)  # past the refit on the images train has now
    # an image more costs its pass (at the pace measured so far; 0 when the pass came from the cache)
    # and its share of the refit: the pass stops in time for the refit of every image it may reach
    reach = min(len(rest), spare / max(ctx.timings.pass_seconds_per_image(prepared.spec) + fitted / n, 1e-9))
    if not rest or reach < MIN_GROWTH * n:
        return prepared, choice, model
    with ctx.timings.stage("extend"):
        X, y = _more_codes(model, rest, time.monotonic() + spare - fitted * reach / n)
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


def _more_codes(model: FittedModel, samples: list, deadline: float) -> tuple[np.ndarray, np.ndarray]:
    """The codes of ``samples`` at the model's tap, in their order, as far as the pass gets by ``deadline``."""
    config, backbone = model.config, model.backbone
    with CodeExtractor(backbone.model, code_tap(config), config.layer_relu) as extractor:
        loader = eval_loader(samples, backbone.data_config, config.batch_size, config.num_workers)
        return extract_codes(extractor, loader, resolve_device(config.device), "Codes (more train)", deadline=deadline,
                             at_least=1)


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
