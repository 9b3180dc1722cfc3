"""Calibration and the evaluation's figures, against known values and synthetic classifiers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from tlpipe.bundle.calibration import calibrate, expected_calibration_error, fit_scale, nll
from tlpipe.bundle.metrics import evaluation_metrics
from tlpipe.training.head import LinearHead


def overconfident(n: int = 4000, classes: int = 4, seed: int = 0):
    """Labels drawn from softmax(z), and a head whose logits are 4 z: right on average, far too sure."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes)) * 1.5
    y = np.array([rng.choice(classes, p=p) for p in softmax(z, axis=1)])
    head = LinearHead(np.eye(classes, dtype=np.float32) * 4, np.zeros(classes, np.float32), "finetune")
    return head, z.astype(np.float32), y


def test_temperature_scaling_undoes_overconfidence_and_lowers_ece():
    head, codes, y = overconfident()
    calibrated, report = calibrate(head, codes, y)
    assert report["kept"] and report["temperature"] == pytest.approx(4.0, rel=0.1)  # the factor put in
    assert report["ece_after"] < report["ece_before"] / 3 and report["nll_after"] < report["nll_before"]
    assert calibrated.scale == pytest.approx(1 / report["temperature"], rel=1e-3) and head.scale == 1.0  # a new head


def test_a_calibrated_head_is_left_as_it_is():
    head, codes, y = overconfident(seed=1)
    head = LinearHead(head.weight / 4, head.bias, "finetune")  # logits z: calibrated by construction
    _, report = calibrate(head, codes, y)
    assert report["temperature"] == pytest.approx(1.0, abs=0.1) and report["nll_after"] <= report["nll_before"]


def test_a_handful_of_right_answers_cannot_drive_the_temperature_to_zero():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = np.array([0, 1, 0])
    plain = np.exp(5)  # the bound an unregularized fit runs to: NLL falls for ever as the scale grows
    assert fit_scale(logits, y) < plain / 10
    assert nll(logits, y, fit_scale(logits, y)) < nll(logits, y)


def test_ece_of_known_bins():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])  # bin 0.9: accuracy 0.5; bin 0.6: accuracy 1.0
    assert expected_calibration_error(probabilities, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_evaluation_figures_match_their_definitions():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.35, 0.25, 0.4]] * 5)
    y = np.array([0, 1, 1, 1] * 5)  # class 2 absent from the folder: it has no F1 to average
    m = evaluation_metrics(y, probabilities, ["a", "b", "c"])
    assert m["accuracy"] == 0.5 and m["accuracy_ci"] == pytest.approx([0.299, 0.701], abs=1e-3)  # Wilson, 10 of 20
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 / 3) / 2)
    f1_a, f1_b = 2 * 0.5 * 1 / 1.5, 2 * 1 * (1 / 3) / (4 / 3)
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b) / 2) and m["macro_f1_ci"][0] <= m["macro_f1"] <= m["macro_f1_ci"][1]
    assert m["top_2_accuracy"] == pytest.approx(0.75)
    onehot = np.eye(3)[y]
    assert m["brier"] == pytest.approx(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))
    assert m["nll"] == pytest.approx(-np.mean(np.log(probabilities[np.arange(20), y])))
    assert {(p["true"], p["predicted"], p["count"]) for p in m["most_confused"]} == {("b", "a", 5), ("b", "c", 5)}


def test_macro_f1_of_many_resamples_at_once_is_scikit_learns_for_each():
    from sklearn.metrics import f1_score

    from tlpipe.bundle.metrics import macro_f1

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, (3, 2, 30)), rng.integers(0, 6, (3, 2, 30))  # labels 4, 5 only predicted
    present = np.array([0, 2, 3])
    expected = [[f1_score(t, p, labels=present, average="macro", zero_division=0) for t, p in zip(ts, ps)]
                for ts, ps in zip(y_true, y_pred)]
    assert macro_f1(y_true, y_pred, present) == pytest.approx(np.array(expected))
    assert macro_f1(y_true.T, y_pred.T, present, axis=0) == pytest.approx(np.array(expected).T)


def test_a_perfect_model_with_a_rare_class_gets_intervals_at_one():
    from tlpipe.bundle.metrics import multilabel_metrics

    y = np.array([0] * 50 + [1] * 50 + [2] * 2)  # most resamples draw no image of class 2: not a zero to average
    m = evaluation_metrics(y, np.eye(3)[y] * 0.9 + 0.05, ["a", "b", "c"])
    assert m["macro_f1"] == 1.0 and m["macro_f1_ci"] == [1.0, 1.0]
    Y = np.zeros((100, 3), int)
    Y[:40, 0], Y[30:80, 1], Y[:2, 2] = 1, 1, 1
    figures = multilabel_metrics(Y, Y * 0.8 + 0.1, np.full(3, 0.5), ["a", "b", "c"])
    assert figures["mean_average_precision_ci"] == [1.0, 1.0] and figures["per_class"]["c"]["average_precision_ci"] == [1.0, 1.0]


def test_a_single_image_gets_figures_not_a_crash():
    m = evaluation_metrics(np.array([1]), np.array([[0.2, 0.8]]), ["a", "b"])
    assert m["accuracy"] == 1.0 and m["macro_f1_ci"] == [0.0, 1.0] and m["accuracy_ci"][1] == 1.0
