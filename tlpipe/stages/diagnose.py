"""Stage 3 of ``fit``, diagnose: what the data itself says, from the codes choose extracted (seconds,
no image read again): the train images whose labels the codes contradict (``tlpipe.insight.
label_issues``) and what more images would buy (``tlpipe.insight.learning_curve``). With
``exclude_label_issues`` the suspects leave train for every later stage, the linear classifier's val
change measured on the way; the dataset itself is never touched."""
from __future__ import annotations

import dataclasses

import numpy as np

from tlpipe.config import FitConfig
from tlpipe.insight.label_issues import find_label_issues
from tlpipe.insight.learning_curve import learning_curve
from tlpipe.insight.diagnosis import Diagnosis
from tlpipe.stages.context import Choice, FitContext, Prepared
from tlpipe.strategy.policy import LinearFit, cached_fit_linear
from tlpipe.training.linear import accuracy, fit_head

MULTILABEL_NOTE = "not computed for multi-label sets yet"


def diagnose(ctx: FitContext, prepared: Prepared, choice: Choice) -> tuple[Prepared, Choice]:
    """The label suspects and the learning curve on the linear classifier's codes, in a new Choice;
    with ``exclude_label_issues``, a Prepared and Choice whose train split leaves the suspects out."""
    if prepared.spec.multilabel:
        return prepared, dataclasses.replace(choice, diagnosis=Diagnosis(note=MULTILABEL_NOTE))
    config, codes = choice.config, _linear_codes(choice)
    (X, y), (X_val, y_val) = codes["train"], codes["val"]
    with ctx.timings.stage("diagnose"):
        issues = find_label_issues(X, y, tuple(config.linear.c_grid), config.seed)
        curve = None if issues is None else learning_curve(X, y, X_val, y_val, "logreg", issues.C, config.seed)
    train = prepared.spec.splits["train"]
    diagnosis = Diagnosis(issues, tuple(train[i] for i in issues.rows) if issues is not None else (), curve)
    if not (config.exclude_label_issues and issues is not None and len(issues)):
        return prepared, dataclasses.replace(choice, diagnosis=diagnosis)
    return _without_suspects(prepared, choice, diagnosis)


def _linear_codes(choice: Choice) -> dict:
    """The codes the linear classifier stands on: the tap auto chose, else the strategy's codes."""
    return choice.linear.codes if choice.linear is not None else choice.codes


def _without_suspects(prepared: Prepared, choice: Choice, diagnosis: Diagnosis) -> tuple[Prepared, Choice]:
    """Train without the flagged images, everywhere a later stage reads it (the split, the codes, the
    linear classifier saved first and the guard's baseline), and the softmax regression's val
    accuracy with and without them."""
    issues = diagnosis.label_issues
    keep = np.setdiff1d(np.arange(issues.checked), issues.rows)
    drop = lambda codes: {**codes, "train": tuple(part[keep] for part in codes["train"])}  # noqa: E731
    (X, y), (X_val, y_val) = _linear_codes(choice)["train"], _linear_codes(choice)["val"]
    before, after = (accuracy(fit_head("logreg", issues.C, X[rows], y[rows], choice.config.seed), X_val, y_val)
                     for rows in (np.arange(len(y)), keep))
    excluded = {"images": len(issues), "val_accuracy_with": round(before, 4), "val_accuracy_without": round(after, 4)}
    train = prepared.spec.splits["train"]
    spec = dataclasses.replace(prepared.spec, splits={**prepared.spec.splits, "train": [train[i] for i in keep]})
    linear = choice.linear and _refitted(choice.linear, drop(choice.linear.codes))
    choice = dataclasses.replace(choice, codes=drop(choice.codes), linear=linear,
                                 diagnosis=dataclasses.replace(diagnosis, excluded=excluded))
    return dataclasses.replace(prepared, spec=spec), choice


def _refitted(linear: LinearFit, codes: dict) -> LinearFit:
    """The same classifier settings fitted again on ``codes``."""
    config: FitConfig = linear.config
    return LinearFit(linear.tap, cached_fit_linear(config, codes), codes, config)
