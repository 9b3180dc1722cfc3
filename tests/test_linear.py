"""The linear strategy: C by cross-validation, and an exported head that predicts like scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_classification

from tlpipe.training import LinearHead, LinearProbe


def codes(n_classes: int, seed: int = 0):
    X, y = make_classification(240, 40, n_informative=12, n_classes=n_classes, n_clusters_per_class=1,
                               class_sep=2.0, random_state=seed)
    X = np.maximum(X, 0).astype(np.float32) * 3 + 1  # non-negative, not standardized: like CNN codes
    return X[:160], y[:160], X[160:], y[160:]


@pytest.mark.parametrize("n_classes", [2, 4])
def test_exported_head_predicts_exactly_like_the_fitted_pipeline(n_classes):
    X, y, X_val, y_val = codes(n_classes)
    probe = LinearProbe(("logreg", "svm"), c_grid=(0.01, 0.1, 1.0), cv_folds=3).fit(X, y, X_val, y_val)
    assert set(probe.candidates_) == {"logreg", "svm"}
    assert probe.head_ is probe.candidates_[probe.chosen_]["head"]
    for candidate in probe.candidates_.values():
        head = candidate["head"]
        assert head.weight.shape == (n_classes, 40)
        proba = head.predict_proba(X_val)
        np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
        assert (head.predict(X_val) == proba.argmax(axis=1)).all()
        assert candidate["val_accuracy"] == pytest.approx((head.predict(X_val) == y_val).mean())
        assert candidate["val_accuracy"] > 0.8


def test_logistic_probabilities_are_the_models_own():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from tlpipe.training.linear import ShrunkScaler

    X, y, X_val, y_val = codes(3)
    probe = LinearProbe(("logreg",), c_grid=(0.1,), cv_folds=3).fit(X, y, X_val, y_val)
    reference = make_pipeline(ShrunkScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(X, y)
    np.testing.assert_allclose(probe.head_.predict_proba(X_val), reference.predict_proba(X_val), atol=1e-4)


def test_regularization_is_chosen_by_cross_validation():
    X, y, X_val, y_val = codes(3)
    probe = LinearProbe(("logreg",), c_grid=(1e-6, 1.0), cv_folds=3).fit(X, y, X_val, y_val)
    assert probe.candidates_["logreg"]["C"] == 1.0  # C=1e-6 underfits badly; CV must see it


def test_svm_temperature_is_fitted_and_head_round_trips_through_tensors():
    X, y, X_val, y_val = codes(3)
    probe = LinearProbe(("svm",), c_grid=(0.1,), cv_folds=3).fit(X, y, X_val, y_val)
    head = probe.head_
    assert head.scale > 0 and head.scale != 1.0
    again = LinearHead.from_tensors(head.tensors(), "svm")
    np.testing.assert_array_equal(again.predict_proba(X_val), head.predict_proba(X_val))


def test_the_scaler_trusts_per_feature_variances_only_as_far_as_the_images_allow():
    from sklearn.preprocessing import StandardScaler

    from tlpipe.training.linear import ShrunkScaler

    rng = np.random.default_rng(0)
    many = rng.normal(size=(100_000, 3)) * [0.5, 1.0, 2.0]
    few = rng.normal(size=(6, 3)) * [0.01, 1.0, 2.0]
    np.testing.assert_allclose(ShrunkScaler().fit(many).scale_, StandardScaler().fit(many).scale_, rtol=1e-2)
    shrunk, plain = ShrunkScaler().fit(few).scale_, StandardScaler().fit(few).scale_
    assert shrunk[0] > 10 * plain[0]  # a feature that barely varied in 6 codes is not blown up
    assert shrunk.max() / shrunk.min() < plain.max() / plain.min()


@pytest.mark.parametrize("kind", ["logreg", "svm"])
def test_the_regularization_path_chooses_as_the_plain_grid_search(kind):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from tlpipe.training.linear import PATH_PATIENCE, cv_path, linear_estimator

    X, y, _, _ = codes(4)
    grid, cv = (1e-3, 1e-2, 0.1, 1.0), StratifiedKFold(3, shuffle=True, random_state=0)
    scores, decisions = cv_path(kind, X, y, cv, grid)
    step = {"logreg": "logisticregression", "svm": "squaredhingesvc"}[kind]
    plain = GridSearchCV(linear_estimator(kind, grid[0]), {f"{step}__C": list(grid)}, cv=cv, refit=False).fit(X, y)
    ran = np.isfinite(scores)  # the path stops once PATH_PATIENCE C values in a row score below the best
    np.testing.assert_allclose(scores[ran], plain.cv_results_["mean_test_score"][ran], atol=0.02)
    assert grid[int(np.argmax(scores))] == plain.best_params_[f"{step}__C"]
    assert set(decisions) == ({c for c, r in zip(grid, ran) if r} if kind == "svm" else set())
    skipped = int((~ran).sum())
    if skipped:
        assert not ran[-skipped:].any() and (scores[ran][-PATH_PATIENCE:] < scores.max()).all()


def test_the_decision_reads_its_cross_validation_from_the_cache(tmp_path, monkeypatch):
    from tlpipe.config import load_config
    from tlpipe.strategy import policy

    X, y, X_val, y_val = codes(3)
    config = load_config("quick", cache_dir=str(tmp_path), device="cpu")
    calls = []
    fit = policy.fit_linear
    monkeypatch.setattr(policy, "fit_linear", lambda *args: calls.append(1) or fit(*args))
    first = policy.cached_fit_linear(config, {"train": (X, y), "val": (X_val, y_val)})
    again = policy.cached_fit_linear(config, {"train": (X, y), "val": (X_val, y_val)})
    assert len(calls) == 1 and len(list((tmp_path / "decision").glob("*.npz"))) == 1
    assert again.details == first.details and again.head.kind == first.head.kind
    np.testing.assert_array_equal(again.head.predict_proba(X_val), first.head.predict_proba(X_val))
    policy.cached_fit_linear(config, {"train": (X + 1, y), "val": (X_val, y_val)})  # other codes: computed anew
    assert len(calls) == 2


@pytest.mark.parametrize("n_classes", [2, 5])
def test_the_svm_solves_liblinears_problem_at_least_as_well(n_classes):
    """SquaredHingeSVC against sklearn's LinearSVC (liblinear) on the same problem: an objective no
    higher, the same predictions, its scores shaped alike; warm-started along C, the same optimum."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from tlpipe.training.linear import SquaredHingeSVC

    X, y, X_val, _ = codes(n_classes, seed=3)
    X, X_val = StandardScaler().fit(X).transform(X), StandardScaler().fit(X).transform(X_val)

    def objective(model, C):  # 1/2 |w|^2 (intercept included) + C sum of squared hinges, one-vs-rest
        scores = np.atleast_2d(model.decision_function(X).T).T
        signs = np.where(y[:, None] == model.classes_[None], 1.0, -1.0)[:, -scores.shape[1]:]
        return 0.5 * ((model.coef_ ** 2).sum() + (model.intercept_ ** 2).sum()) + C * (np.maximum(0, 1 - signs * scores) ** 2).sum()

    warm = SquaredHingeSVC(warm_start=True)
    for C in (0.01, 0.1, 1.0):
        ours, theirs = SquaredHingeSVC(C=C).fit(X, y), LinearSVC(C=C, dual=True, max_iter=20000, tol=1e-6).fit(X, y)
        assert objective(ours, C) <= objective(theirs, C) * (1 + 1e-4)
        assert (ours.predict(X_val) == theirs.predict(X_val)).mean() >= 0.98
        assert ours.decision_function(X_val).shape == theirs.decision_function(X_val).shape
        warm.set_params(C=C).fit(X, y)
        assert objective(warm, C) == pytest.approx(objective(ours, C), rel=1e-4)


def test_on_a_large_train_c_is_chosen_on_a_stratified_part_and_the_classifier_fitted_on_all(monkeypatch):
    import tlpipe.training.linear as linear

    X, y, X_val, y_val = codes(4)
    monkeypatch.setattr(linear, "CV_MAX_IMAGES", 60)  # 160 train images stand in for tens of thousands
    probe = LinearProbe(("logreg",), c_grid=(0.001, 0.01, 0.1, 1.0), cv_folds=3).fit(X, y, X_val, y_val)
    rows = linear.cv_rows(y, 0, least=3)
    assert len(rows) == 60 and set(y[rows]) == set(y)
    on_part = LinearProbe(("logreg",), c_grid=(0.001, 0.01, 0.1, 1.0), cv_folds=3).fit(X[rows], y[rows], X_val, y_val)
    assert probe.C_ == on_part.C_ and probe.candidates_["logreg"]["cv_accuracy"] == on_part.candidates_["logreg"]["cv_accuracy"]
    np.testing.assert_allclose(probe.head_.weight, linear.fit_head("logreg", probe.C_, X, y).weight)  # all 160
    assert "stratified 60 of the 160 train images" in probe.cv_note_ and on_part.cv_note_ is None
