"""Stage 4 of ``fit``, diagnose: what the data itself says, from the codes choose extracted (seconds,
no image read again): the train images whose labels the codes contradict (``tlpipe.insight.
label_issues``) and what more images would buy (``tlpipe.insight.learning_curve``). With
``exclude_label_issues`` the suspects leave train for every later stage, the linear classifier's val
change measured on the way; the dataset itself is never touched."""
from __future__ import annotations

import dataclasses

import numpy as np

from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec, stratified_subset
from tlpipe.insight.label_issues import LabelIssues, find_label_issues
from tlpipe.insight.learning_curve import learning_curve
from tlpipe.insight.diagnosis import Diagnosis
from tlpipe.stages.context import Choice, Codes, FitContext, Prepared
from tlpipe.strategy.policy import LinearFit, cached_fit_linear
from tlpipe.training.linear import CV_MAX_IMAGES, fit_head, head_score
from tlpipe.training.multilabel import fit_multilabel_head


def diagnose(ctx: FitContext, prepared: Prepared, choice: Choice) -> tuple[Prepared, Choice]:
    """The label suspects (on the strategy's codes, which a tuning worker has too) and the learning
    curve (on the linear classifier's), in a new Choice; with ``exclude_label_issues``, a Prepared
    and Choice whose train split leaves the suspects out."""
    config, linear_codes = choice.config, _linear_codes(choice)
    with ctx.timings.stage("diagnose"):
        issues = find_label_issues(*choice.codes["train"], tuple(config.linear.c_grid), config.seed)
        curve = learning_curve(*linear_codes["train"], *linear_codes["val"], *_curve_classifier(issues, linear_codes, config),
                               config.seed, whole=(prepared.sampled_from or {}).get("train"))
    train = prepared.spec.splits["train"]
    diagnosis = Diagnosis(issues, tuple(train[i] for i in issues.rows) if issues is not None else (), curve)
    if not (config.exclude_label_issues and issues is not None and len(issues)):
        return prepared, dataclasses.replace(choice, diagnosis=diagnosis)
    return _without_suspects(prepared, choice, diagnosis)


def without_label_issues(spec: DatasetSpec, codes: Codes, config: FitConfig) -> tuple[DatasetSpec, Codes]:
    """A tuning worker's train as its lead's diagnose left it: without the suspects, found the same
    way on the same codes (with ``exclude_label_issues``; else as given)."""
    if not config.exclude_label_issues:
        return spec, codes
    issues = find_label_issues(*codes["train"], tuple(config.linear.c_grid), config.seed)
    return (spec, codes) if issues is None else without_rows(spec, codes, issues.excludable(codes["train"][1]))


def without_rows(spec: DatasetSpec, codes: Codes, rows: np.ndarray) -> tuple[DatasetSpec, Codes]:
    """``spec`` and ``codes`` with the train rows ``rows`` left out (new objects: neither is changed)."""
    keep = np.setdiff1d(np.arange(len(spec.splits["train"])), rows)
    train = spec.splits["train"]
    return (dataclasses.replace(spec, splits={**spec.splits, "train": [train[i] for i in keep]}),
            {**codes, "train": tuple(part[keep] for part in codes["train"])})


def _curve_classifier(issues: LabelIssues | None, codes: Codes, config: FitConfig) -> tuple[str, float]:
    """The logistic regression the learning curve refits: the label check's C (by cross-validation),
    else (a class too small to hold an image out) the grid's C that scores best on val, fitted on at
    most ``CV_MAX_IMAGES`` of train (as the cross-validation is)."""
    if issues is not None:
        return "logreg", issues.C
    X, y = codes["train"]
    rows = stratified_subset(y, CV_MAX_IMAGES, config.seed) if len(y) > CV_MAX_IMAGES else slice(None)
    return "logreg", max(config.linear.c_grid, key=lambda C: head_score(_fitted(C, X[rows], y[rows], config.seed), *codes["val"]))


def _fitted(C: float, X: np.ndarray, y: np.ndarray, seed: int):
    """The logistic regression on the codes (one-vs-rest for a multi-label ``y``)."""
    return fit_multilabel_head(C, X, y, seed) if y.ndim == 2 else fit_head("logreg", C, X, y, seed)


def _linear_codes(choice: Choice) -> Codes:
    """The codes the linear classifier stands on: the tap auto chose, else the strategy's codes."""
    return choice.linear.codes if choice.linear is not None else choice.codes


def _without_suspects(prepared: Prepared, choice: Choice, diagnosis: Diagnosis) -> tuple[Prepared, Choice]:
    """Train without the flagged images, everywhere a later stage reads it (the split, the codes, the
    linear classifier saved first and the guard's baseline), and the logistic regression's val
    score (accuracy; multi-label: mAP) with and without them."""
    issues, seed = diagnosis.label_issues, choice.config.seed
    rows = issues.excludable(choice.codes["train"][1])
    spec, codes = without_rows(prepared.spec, choice.codes, rows)
    before, after = (head_score(_fitted(issues.C, *train, seed), *choice.codes["val"]) for train in (choice.codes["train"], codes["train"]))
    excluded = {"images": len(rows), "kept_for_their_class": len(issues) - len(rows), "score": "mAP" if prepared.spec.multilabel else "accuracy",
                "val_with": round(before, 4), "val_without": round(after, 4)}
    linear = choice.linear and _refitted(choice.linear, without_rows(prepared.spec, choice.linear.codes, rows)[1])
    choice = dataclasses.replace(choice, codes=codes, linear=linear, diagnosis=dataclasses.replace(diagnosis, excluded=excluded))
    return dataclasses.replace(prepared, spec=spec), choice


def _refitted(linear: LinearFit, codes: Codes) -> LinearFit:
    """The same classifier settings fitted again on ``codes``."""
    config: FitConfig = linear.config
    return LinearFit(linear.tap, cached_fit_linear(config, codes), codes, config)
