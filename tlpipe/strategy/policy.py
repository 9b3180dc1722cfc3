"""The auto policy, step by step, each step a function that returns a new ``Decision``:

1. ``decide`` (``decision.py``): size, distance and cost, measured by ``assess`` (``auto.py``);
2. ``choose_tap``: a linear classifier on the last features, on the earlier stage the probes rank
   best and on both side by side, the best on validation kept (ties to the last features). It runs
   whatever the decision: it is the linear strategy's model, and the baseline a fine-tune must beat;
3. ``guard``: after a fine-tune, keep it only if it beats that linear classifier, tuned as a linear
   fit tunes it (``tuned_baseline``), by more than its standard error on validation.

``tlpipe fit`` runs all three; ``tlpipe inspect`` runs the first two, so both name the same
strategy and tap (the guard needs the fine-tune itself).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tlpipe.cache import cache_key, load_cached, save_cached
from tlpipe.config import FitConfig
from tlpipe.models import PENULTIMATE
from tlpipe.strategy.auto import Assessment
from tlpipe.strategy.decision import Decision, keep_finetune, standard_error
from tlpipe.training.head import LinearHead
from tlpipe.training.fits import TrainedHead, fit_linear
from tlpipe.training.linear import cv_rows

Codes = dict[str, tuple[np.ndarray, np.ndarray]]
# The arrays a cached linear fit holds, named in its key: an entry of another layout is a miss, not a KeyError
_DECISION_ARRAYS = ("weight", "bias", "kind", "scale", "thresholds", "val_accuracy", "C", "details")


@dataclass(frozen=True)
class LinearFit:
    """A linear classifier on one tap, with the codes it was fitted on (train, val)."""

    tap: str
    trained: TrainedHead
    codes: Codes
    config: FitConfig  # strategy linear on this tap: the recipe's classifiers and C grid, or (tuned) its own

    @property
    def val_accuracy(self) -> float:
        return self.trained.val_accuracy


def _tap_name(tap: str) -> str:
    return "the last features" if tap == PENULTIMATE else tap


def choose_tap(assessment: Assessment, config: FitConfig) -> tuple[Assessment, LinearFit]:
    """Fit a linear classifier on each of ``assessment.linear_taps()`` (their codes all come from
    the assessment's one pass) and return the assessment whose decision holds the best tap on
    validation, with that classifier. The taps are compared with the recipe's first classifier
    alone (C by cross-validation), fitted on at most ``CV_MAX_IMAGES`` train images (``cv_rows``;
    the one kept is then fitted on all): the study that follows tunes classifier and C on the tap
    kept, so fitting every classifier on every tap, on every image, would only multiply the
    decision's cost."""
    fits = {}
    compare = config.linear.model_copy(update={"classifiers": config.linear.classifiers[:1]})
    for tap in assessment.linear_taps():
        codes = {split: assessment.codes(split, tap) for split in ("train", "val")}
        tap_config = config.model_copy(update={"strategy": "linear", "layer": tap})
        trained = cached_fit_linear(tap_config.model_copy(update={"linear": compare}), _compared_part(codes, config))
        fits[tap] = LinearFit(tap, trained, codes, tap_config)
    best = max(fits.values(), key=lambda fit: fit.val_accuracy)  # the first (last features) wins a tie
    train, part = best.codes["train"][1], len(_compared_part(best.codes, config)["train"][1])
    reason = ("Linear classifiers on validation" + (f" (fitted on a stratified {part:,} of the {len(train):,} train images)"
                                                    if part < len(train) else "") + ": "
              + ", ".join(f"{_tap_name(t)} {f.val_accuracy:.3f}" for t, f in fits.items())
              + f"; {_tap_name(best.tap)} kept.")
    if part < len(train):  # the one kept, on every image
        best = replace(best, trained=cached_fit_linear(best.config.model_copy(update={"linear": compare}), best.codes))
    return replace(assessment, decision=assessment.decision.with_reason(reason, layer=best.tap)), best


def _compared_part(codes: Codes, config: FitConfig) -> Codes:
    """``codes`` with train cut to ``cv_rows`` (all of it, up to ``CV_MAX_IMAGES``)."""
    X, y = codes["train"]
    rows = cv_rows(y, config.seed, least=config.linear.cv_folds)
    return codes if len(rows) == len(y) else {**codes, "train": (X[rows], y[rows])}


def cached_fit_linear(config: FitConfig, codes: Codes) -> TrainedHead:
    """``fit_linear(config, codes)``, kept under ``<cache_dir>/decision/<key>.npz`` (the head's arrays
    and its details as JSON), so a re-run on the same codes skips the cross-validation. The key
    hashes the codes themselves and the linear settings: codes from edited images or another
    backbone are other bytes, so no stale entry is read. Not the bundle's ``head.safetensors``: that
    keeps the scale in float32, and calibration starts from this head's float64 scale, so a cache hit
    would not give the very head a miss gives. The details are the report's alone: the typed values
    (kind, val accuracy, C) are arrays of their own."""
    if not config.cache_dir:
        return fit_linear(config, codes)
    digest = hashlib.sha256()
    for X, y in (codes["train"], codes["val"]):
        digest.update(np.ascontiguousarray(X).tobytes() + np.ascontiguousarray(y).tobytes())
    key = cache_key([], codes=digest.hexdigest(), linear=config.linear.model_dump(mode="json"), seed=config.seed,
                    holds=_DECISION_ARRAYS)
    path = Path(config.cache_dir) / "decision" / f"{key}.npz"
    saved = load_cached(path, key)
    if saved is not None:
        multilabel = saved["thresholds"].size > 0  # a scale per class, and its thresholds
        head = LinearHead(saved["weight"], saved["bias"], str(saved["kind"]),
                          saved["scale"] if multilabel else float(saved["scale"]), saved["thresholds"] if multilabel else None)
        return TrainedHead(head, float(saved["val_accuracy"]), json.loads(str(saved["details"])), C=float(saved["C"]))
    trained = fit_linear(config, codes)
    head = trained.head
    save_cached(path, key, {"weight": head.weight, "bias": head.bias, "kind": np.array(head.kind), "scale": np.array(head.scale),
                            "thresholds": np.array([] if head.thresholds is None else head.thresholds),
                            "val_accuracy": np.array(trained.val_accuracy), "C": np.array(trained.C),
                            "details": np.array(json.dumps(trained.details))})
    return trained


def tuned_baseline(fit: LinearFit, out: Path, data: str, timeout: float | None = None) -> LinearFit:
    """``fit``'s classifier and C tuned as a linear fit tunes them (a study of its own of ``data``,
    the dataset's identity, in ``<out>/linear_baseline``, trial 0 ``fit``'s own, for at most
    ``timeout`` seconds), so falling back loses nothing against ``--strategy linear``."""
    from tlpipe.tuning import linear_objective, tune

    objective = linear_objective(fit.codes, fit.trained.linear_params())
    tuned = tune(fit.config, Path(out) / "linear_baseline", objective, timeout=timeout, data=data)
    return LinearFit(fit.tap, fit_linear(tuned.config, fit.codes), fit.codes, tuned.config)


def guard(decision: Decision, finetune_accuracy: float, baseline_accuracy: float, n_val: int) -> Decision:
    """The decision after the fine-tune: kept when it beats the linear baseline by more than the
    baseline's standard error on ``n_val`` images, else linear on the decision's tap."""
    pays = keep_finetune(finetune_accuracy, baseline_accuracy, n_val)
    reason = (f"Guard: the fine-tune scored {finetune_accuracy:.3f} on validation against {baseline_accuracy:.3f} for "
              f"the linear classifier (standard error {standard_error(baseline_accuracy, n_val):.3f}): "
              + ("the fine-tune is kept." if pays else "not clearly better, so the linear classifier stands."))
    if pays:
        return decision.with_reason(reason)
    return decision.fall_back(reason)
