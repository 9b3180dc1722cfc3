"""Stage 7 of ``fit``, check: the model to save, scored through the prediction path. A fine-tune at
its training resolution and the native one (the better kept) and, under auto, against the tuned
linear classifier (the guard); then the test-time choices made on val (flip averaging, a larger
test resolution), the temperature fitted on the val logits, the threshold past which an image
is of no class the model knows (``tlpipe.bundle.unknowns``), and a fine-tune's label suspects
found again on the codes of the network it became."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from tlpipe.bundle.calibration import calibrate
from tlpipe.bundle.unknowns import fit_unknowns
from tlpipe.insight.label_issues import find_label_issues
from tlpipe.models import PENULTIMATE, Backbone, dataset_codes
from tlpipe.run.outputs import FittedModel
from tlpipe.stages.choose import code_tap
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.strategy.policy import guard
from tlpipe.training.linear import head_score, mean_average_precision


def check(ctx: FitContext, prepared: Prepared, choice: Choice, model: FittedModel) -> FittedModel:
    """The model to save, scored, given its test-time choice, calibrated on val, with its unknown-image
    detector and a fine-tune's label suspects: see ``_kept``, ``_test_time``, ``_calibrated``,
    ``_with_unknowns`` and ``_with_label_issues``."""
    model = _kept(ctx, prepared, choice, model)
    with ctx.timings.stage("test_time"):
        model = _test_time(ctx, prepared, model)
    model = _calibrated(model)
    with ctx.timings.stage("unknowns"):
        train = _final_train_codes(ctx, prepared, choice, model)
        model = _with_unknowns(model, train)
    with ctx.timings.stage("label_issues"):
        return _with_label_issues(ctx, prepared, choice, model, train)


def _test_time(ctx: FitContext, prepared: Prepared, model: FittedModel) -> FittedModel:
    """Test-time choices made on val: flip averaging (a second forward pass per image) and a larger
    test resolution (for a head on globally pooled codes, the seed notes' FC layers run as
    convolutions over a larger image, their scores averaged). One is kept only when it beats the
    plain pass (accuracy; multi-label: mAP) by more than the standard error of the paired
    difference, the larger gain first; none is tried when the time left cannot hold the extra val passes."""
    if not model.config.test_time:
        return _with_details(model, test_time={"choice": "none", "reason": "off in the recipe (test_time: false)"})
    X, y = model.val_codes
    options = _test_time_options(model)
    extra_passes = sum(cost for *_, cost in options) * ctx.timings.pass_seconds_per_image(prepared.spec) * len(y)
    if ctx.budget.left() < 2 * extra_passes:
        return _with_details(model, test_time={"choice": "none", "reason": "no time left for the extra val passes"})
    head, seed = model.trained.head, model.config.seed
    scored, tried = {}, {}
    for name, backbone, hflip, cost in options:
        start = time.perf_counter()
        codes = dataset_codes(backbone, prepared.spec, "val", model.config, code_tap(model.config),
                              cache=Path(model.config.cache_dir), hflip=hflip)
        score, gain, se = paired_gain(head, X, codes[0], y, seed)
        scored[name] = {"val": score, "gain": gain, "standard_error": se, "forward_passes": cost,
                        "images_per_second": round(len(y) / max(time.perf_counter() - start, 1e-9), 1)}
        tried[name] = (backbone, hflip, codes)
    paying = [name for name, row in scored.items() if row["gain"] > max(row["standard_error"], 0)]
    choice = max(paying, key=lambda name: scored[name]["gain"]) if paying else "none"
    report = {"choice": choice, "score": "mAP" if head.multilabel else "accuracy", "val_plain": head_score(head, X, y),
              "options": scored, "hflip": choice != "none" and tried[choice][1]}
    model = _with_details(model, test_time=report)
    if choice == "none":
        return model
    backbone, hflip, codes = tried[choice]
    trained = dataclasses.replace(model.trained, hflip=hflip)
    return dataclasses.replace(model, backbone=backbone, val_codes=codes, trained=trained)


BOOTSTRAP = 500  # resamples of val behind a multi-label gain's standard error


def paired_gain(head, X_plain: np.ndarray, X_option: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """The val score (``head_score``) on an option's codes, its gain over the plain codes, and the
    gain's standard error on the same images: accuracy's from the per-image difference; mAP's, which
    is no mean over images, from ``BOOTSTRAP`` paired resamples of them."""
    if not head.multilabel:
        option_right = head.predict(X_option) == y
        difference = option_right.astype(float) - (head.predict(X_plain) == y)
        se = float(difference.std(ddof=1) / np.sqrt(len(y))) if len(y) > 1 else 0.0
        return float(option_right.mean()), float(difference.mean()), se
    plain, option = head.logits(X_plain), head.logits(X_option)
    rng = np.random.default_rng(seed)
    resamples = (rng.integers(0, len(y), len(y)) for _ in range(BOOTSTRAP))
    gains = [mean_average_precision(y[rows], option[rows]) - mean_average_precision(y[rows], plain[rows]) for rows in resamples]
    score = mean_average_precision(y, option)
    return score, score - mean_average_precision(y, plain), float(np.std(gains, ddof=1))


def _test_time_options(model: FittedModel) -> list[tuple[str, Backbone, bool, float]]:
    """(name, backbone at its test resolution, flip averaging, forward passes per image relative to
    the plain one): flip, and the pretrained config's ``test_input_size`` or about 1.15x the side."""
    backbone = model.backbone
    side = backbone.data_config["input_size"][-1]
    test_size = (backbone.model.pretrained_cfg.get("test_input_size") or (3, 0, 0))[-1]
    larger = test_size if test_size > side else int(round(side * 1.15 / 32) * 32)
    return [("hflip", backbone, True, 2.0), (f"{larger} px", backbone.at_size(larger), False, (larger / side) ** 2)]


def _with_details(model: FittedModel, **details) -> FittedModel:
    return dataclasses.replace(model, trained=dataclasses.replace(model.trained, details={**model.trained.details, **details}))


def _calibrated(model: FittedModel) -> FittedModel:
    """The head with its temperature fitted on the val logits (kept only if the val NLL improves);
    multi-label: a temperature and a decision threshold per class."""
    head, report = calibrate(model.trained.head, *model.val_codes)
    model = _with_details(model, calibration=report)
    return dataclasses.replace(model, trained=dataclasses.replace(model.trained, head=head))


def _final_train_codes(ctx: FitContext, prepared: Prepared, choice: Choice, model: FittedModel) -> tuple | None:
    """The train codes through the prediction path: the choice's own when the model stands on them; a
    fine-tuned network passes over train once, None when the time left cannot hold that pass."""
    config, spec = model.config, prepared.spec
    frozen = not model.trained.backbone_trained
    train_pass = ctx.timings.pass_seconds_per_image(spec) * len(spec.splits["train"]) * (1 + model.trained.hflip)
    if not frozen and ctx.budget.left() < 2 * train_pass:
        return None
    return _train_codes(choice, model) or dataset_codes(
        model.backbone, spec, "train", config, code_tap(config), hflip=model.trained.hflip,
        cache=Path(config.cache_dir) if frozen else None)


def _with_unknowns(model: FittedModel, train: tuple | None) -> FittedModel:
    """The model with its unknown-image detector: class means and covariance of the ``train`` codes
    (None: a note says the pass did not fit the time left)."""
    if train is None:
        return _with_details(model, unknowns={"note": "no time left for the train pass its class means need"})
    config = model.config
    unknowns = fit_unknowns(train[0], train[1], model.val_codes[0], config.unknown_false_rejection)
    if unknowns is None:
        return _with_details(model, unknowns={"note": "one train image a class: no spread to measure distance by"})
    return dataclasses.replace(model, unknowns=unknowns)


def _with_label_issues(ctx: FitContext, prepared: Prepared, choice: Choice, model: FittedModel,
                       train: tuple | None) -> FittedModel:
    """A fine-tune's label suspects found again on the ``train`` codes of the network it became. With
    10% of train labels flipped and a partial fine-tune (precision / recall, pretrained -> fine-tuned
    codes): bloodcells 0.60 / 0.80 -> 0.74 / 0.76, rsscn7 0.51 / 0.90 -> 0.64 / 0.86, dtd10 0.91 / 0.67
    -> 0.85 / 0.57 (300 images: the network learns some flipped labels). The pretrained codes'
    suspects stand when the fit left them out of train, without the train pass, or when the time
    left cannot hold the search again (twice what the diagnose stage took)."""
    diagnosis = choice.diagnosis
    if (train is None or not model.trained.backbone_trained or diagnosis is None or diagnosis.excluded is not None
            or ctx.budget.left() < 2 * ctx.timings.seconds.get("diagnose", 0.0)):
        return model
    issues = find_label_issues(*train, tuple(model.config.linear.c_grid), model.config.seed)
    if issues is None:
        return model
    samples = prepared.spec.splits["train"]
    suspects = tuple(samples[i] for i in issues.rows)
    fine_tuned = dataclasses.replace(issues, network="fine-tuned")
    return dataclasses.replace(model, diagnosis=dataclasses.replace(diagnosis, label_issues=fine_tuned, suspects=suspects))


def _train_codes(choice: Choice, model: FittedModel) -> tuple | None:
    """The train codes of the choice whose val codes the model still scores on (the very arrays: no
    fine-tune, no test-time option changed its backbone or pass), so the same pass need not run again."""
    for codes in (choice.codes, choice.linear and choice.linear.codes):
        if codes and codes["val"][0] is model.val_codes[0]:
            return codes["train"]
    return None


def _kept(ctx: FitContext, prepared: Prepared, choice: Choice, model: FittedModel) -> FittedModel:
    """A fine-tune scored on val through the path prediction takes, at its training resolution and
    at the native one (the better kept: "train small, test large"); under auto, the guard: kept
    only if it beats the tuned linear classifier on the decision's tap, else that classifier (on
    the pretrained backbone, which the fine-tune trained a copy of) is the model."""
    if not model.trained.backbone_trained:
        return model
    with ctx.timings.stage("evaluate"):
        model = _best_resolution(prepared, model)
    if choice.assessment is None:
        return model
    baseline, val = choice.linear, model.val_codes
    decision = guard(model.decision, head_score(model.trained.head, *val), baseline.val_accuracy, len(val[1]))
    if decision.strategy != "linear":
        return dataclasses.replace(model, decision=decision)
    return FittedModel(baseline.config, prepared.backbone, baseline.trained, baseline.codes["val"], model.tuning, decision)


def _best_resolution(prepared: Prepared, model: FittedModel) -> FittedModel:
    """The fine-tuned model at the resolution that scores best on val, of its training one and the
    backbone's native one (a tie keeps the training one: cheaper to predict)."""
    backbone, native = model.backbone, model.backbone.data_config
    sizes = list(dict.fromkeys([model.config.finetune.image_size or native["input_size"][-1], native["input_size"][-1]]))
    scored = {}
    for size in sizes:
        sized = backbone.at_size(size)
        val = dataset_codes(sized, prepared.spec, "val", model.config, PENULTIMATE)
        scored[size] = (head_score(model.trained.head, *val), sized, val)
    best = max(sizes, key=lambda size: scored[size][0])  # the first, the training size, wins a tie
    _, sized, val = scored[best]
    model = _with_details(model, val_accuracy_by_size={str(s): round(a, 4) for s, (a, *_) in scored.items()},
                          eval_image_size=best)
    return dataclasses.replace(model, backbone=sized, val_codes=val)
