"""The automatic strategy: the decision rule on given signals, the guard, and ``tlpipe inspect`` /
``tlpipe fit --strategy auto`` end to end on a small generated dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import tree_snapshot
from tlpipe.cli import app
from tlpipe.config import load_config
from tlpipe.bundle import load_bundle
from tlpipe.pipeline import fit
from tlpipe.strategy.auto import Assessment
from tlpipe.config import AutoConfig
from tlpipe.strategy.decision import decide, keep_finetune, standard_error
from tlpipe.strategy.policy import choose_tap, guard
from tlpipe.strategy.frozen_pass import FeatureSet
from tlpipe.strategy.signals import Signals

THRESHOLDS = AutoConfig(large_per_class=100, far_gap=0.5)


def signals(gap: float, last: float = 0.80, stage: float = 0.80, sem: float = 0.01) -> Signals:
    stage_row = {"name": "blocks.4", "probe_accuracy": stage, "probe_sem": sem, "knn_accuracy": stage, "logme": 0.0,
                 "bn_gap": gap, "probe_std": 0.0, "dim": 112}
    return Signals(stages=[stage_row], best_stage="blocks.4" if stage > last else "penultimate",
                   penultimate={"probe_accuracy": last, "probe_sem": sem, "knn_accuracy": last, "logme": 0.0,
                                "bn_gap": gap, "probe_std": 0.0, "dim": 1280},
                   imagenet_confidence={"mean_max_prob": 0.5, "mean_entropy": 2.0}, domain_gap=gap, folds=5, seconds=0.1)


@pytest.mark.parametrize("per_class, gap, strategy", [
    (20, 0.2, "linear"), (20, 0.9, "linear"), (150, 0.2, "partial"), (150, 0.9, "full"),
])
def test_the_two_by_two_rule_on_measured_size_and_gap(per_class, gap, strategy):
    decision = decide(signals(gap), per_class, THRESHOLDS)
    assert decision.strategy == strategy
    assert decision.unfreeze_stages == (THRESHOLDS.partial_stages if strategy == "partial" else None)
    assert str(per_class) in decision.explanation and f"{gap:.2f}" in decision.explanation


def test_small_data_is_fine_tuned_where_a_study_fits_the_time_budget():
    thresholds = AutoConfig(large_per_class=150, far_large_per_class=50, finetune_minutes=30, far_gap=0.5)
    assert decide(signals(0.9), 20, thresholds).strategy == "linear"  # cost unknown: the size cuts alone
    assert decide(signals(0.9), 20, thresholds, finetune_minutes=45).strategy == "linear"  # over the budget
    cheap = decide(signals(0.9), 20, thresholds, finetune_minutes=12.5)
    assert cheap.strategy == "full" and cheap.size == "small" and cheap.finetune_minutes == 12.5
    assert "at most 12.5 min" in cheap.explanation and "within the 30-min budget" in cheap.explanation
    assert decide(signals(0.2), 20, thresholds, finetune_minutes=12.5).strategy == "partial"  # near: partial
    never = thresholds.model_copy(update={"finetune_minutes": 0.0})
    assert decide(signals(0.9), 20, never, finetune_minutes=0.5).strategy == "linear"  # 0: cost first
    assert decide(signals(0.9), 20, never, finetune_minutes=0.0).strategy == "linear"  # even for a study of seconds
    explained = decide(signals(0.9), 20, never, finetune_minutes=634.9).explanation
    assert "never fine-tunes small data for being cheap" in explained and "0-min budget" not in explained


def test_far_data_counts_as_large_from_fewer_images():
    thresholds = AutoConfig(large_per_class=150, far_large_per_class=50, far_gap=0.5)
    assert decide(signals(0.9), 60, thresholds).strategy == "full"  # far: large from 50
    assert decide(signals(0.2), 60, thresholds).strategy == "linear"  # near: small under 150
    assert "under 150" in decide(signals(0.2), 60, thresholds).explanation


def test_the_study_estimate_is_every_trial_and_epoch_at_the_measured_speed(image_folder):
    from tlpipe.data import prepare_dataset
    from tlpipe.strategy.auto import finetune_study_seconds

    spec = prepare_dataset(image_folder("data", {"a": 6, "b": 6}, split={"train": 6, "val": 3}), 0.2, 0, report_dir=None)
    features = {split: FeatureSet(codes=np.zeros((n, 4)), stages={}, imagenet_confidence=None, bn_stats={},
                                  labels=np.zeros(n, int), indices=np.arange(n), seconds=0.5 * n)
                for split, n in (("train", 12), ("val", 6))}  # 0.5 s an image over both splits
    epoch = (12 * 3 + 6) * 0.5  # a training step costs 3 forward passes; then val
    config = load_config("default")  # 8 trials of up to 8 epochs
    assert finetune_study_seconds(spec, config, features) == 8 * 8 * epoch
    assert finetune_study_seconds(spec, config, features, trials=2) == 2 * 8 * epoch  # --trials
    untuned = load_config("default", tuning={"trials": 0}, finetune={"epochs": 3})
    assert finetune_study_seconds(spec, untuned, features) == 3 * epoch  # one training


def test_small_data_gets_a_linear_classifier_on_the_tap_that_does_better_on_validation():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    informative = np.eye(3)[y] * 3 + rng.normal(size=(90, 3))  # separates the classes
    noise = rng.normal(size=(90, 16))  # does not

    def assessment(last: np.ndarray, stage: np.ndarray) -> Assessment:
        features = {split: FeatureSet(codes=last[rows], stages={"blocks.4": stage[rows]}, imagenet_confidence=None,
                                      bn_stats={}, labels=y[rows], indices=rows, seconds=0.0)
                    for split, rows in (("train", np.arange(0, 90, 2)), ("val", np.arange(1, 90, 2)))}
        sig = signals(0.9, last=0.4, stage=0.9)
        return Assessment(features, sig, decide(sig, 15, THRESHOLDS))

    far_small = assessment(last=noise, stage=informative)
    assert far_small.decision.strategy == "linear" and "blocks.4" in far_small.decision.explanation
    config = load_config("quick", strategy="auto")
    chosen, best = choose_tap(far_small, config)
    assert chosen.decision.layer == "blocks.4" and best.val_accuracy > 0.9 and best.codes["val"][0].shape == (45, 3)
    assert chosen.apply(config).layer == "blocks.4" and best.config.layer == "blocks.4"
    assert "blocks.4" in chosen.decision.reasons[-1] and "kept" in chosen.decision.reasons[-1]
    assert far_small.decision.layer == "penultimate" and len(far_small.decision.reasons) == len(chosen.decision.reasons) - 1

    near, _ = choose_tap(assessment(last=informative, stage=noise), config)
    assert near.decision.layer == "penultimate" and near.apply(config).layer == "penultimate"
    same, _ = choose_tap(assessment(last=informative, stage=informative), config)
    assert same.decision.layer == "penultimate"  # a tie keeps the last features


def test_the_guard_keeps_a_fine_tune_only_beyond_the_probe_noise():
    se = standard_error(0.90, 400)
    assert se == pytest.approx(0.015)
    assert keep_finetune(0.90 + 2 * se, 0.90, 400)
    assert not keep_finetune(0.90 + 0.5 * se, 0.90, 400)
    assert not keep_finetune(0.85, 0.90, 400)
    full = decide(signals(0.9), 150, THRESHOLDS).with_reason("tap", layer="blocks.4")
    kept = guard(full, 0.90 + 2 * se, 0.90, 400)
    assert kept.strategy == "full" and kept.tap == "penultimate" and "the fine-tune is kept" in kept.reasons[-1]
    fallen = guard(full, 0.90, 0.90, 400)
    assert fallen.strategy == "linear" and fallen.tap == "blocks.4" and "linear classifier stands" in fallen.reasons[-1]
    assert fallen.fallback_from == "full" and kept.fallback_from is None
    assert full.strategy == "full" and len(full.reasons) == len(kept.reasons) - 1  # a new Decision each step


def test_inspect_prints_profile_signals_and_decision_and_writes_nothing(image_folder, tmp_path):
    root = image_folder("data", {"cats": 8, "dogs": 8, "birds": 8}, split={"train": 8, "val": 3})
    before = tree_snapshot(root)
    result = CliRunner().invoke(app, ["inspect", str(root), "--recipe", "quick", "--workers", "0",
                                      "--json", str(tmp_path / "inspect.json")])
    assert result.exit_code == 0, result.output
    assert "Decision" in result.output and "Transfer signals" in result.output and "leakage" in result.output
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["decision"]["strategy"] == "linear"  # 8 images per class is small data
    assert report["profile"]["images_per_class"]["train"] == {"birds": 8, "cats": 8, "dogs": 8}
    assert len(report["signals"]["stages"]) == 5 and report["estimate"]["fit_seconds"] > 0
    assert report["estimate"]["finetune_study_minutes"] == report["decision"]["finetune_minutes"] >= 0
    assert "a fine-tuning study: at most" in " ".join(result.output.split())  # however the terminal wraps it
    best = report["signals"]["best_stage"]  # the best of the earlier stages, which the last features may beat
    assert best in [s["name"] for s in report["signals"]["stages"]] and "(best earlier" in result.output
    assert "0-min budget" not in result.output  # quick never fine-tunes small data for being cheap, and says so
    assert tree_snapshot(root) == before


def test_fit_auto_logs_the_decision_to_mlflow(image_folder, tmp_path, mlflow_store):
    root = image_folder("data", {"cats": 8, "dogs": 8}, split={"train": 8, "val": 3})
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["fit", str(root), "--recipe", "quick", "--workers", "0", "--output", str(out),
                                      "--experiment", "auto-test"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "linear" and "training images" in summary["strategy_reason"]
    assert "Linear classifiers on validation" in summary["strategy_reason"]  # the taps compared, and the scores
    manifest = json.loads((out / "model" / "bundle.json").read_text())
    assert manifest["codes"]["layer"] == summary["auto"]["decision"]["layer"] == summary["layer"]  # the tap that won
    page = (out / "report.html").read_text(encoding="utf-8").split("<h2>Strategy</h2>")[1].split("<h2>")[0]
    assert summary["layer"] == "penultimate" and "<td><b>penultimate</b> (the codes used)</td>" in page  # its row too
    assert not list((out / "cache" / "codes").glob("train-*"))  # the unknowns' class means: the choice's codes, no second pass
    inspected = CliRunner().invoke(app, ["inspect", str(root), "--recipe", "quick", "--workers", "0", "--json", str(tmp_path / "i.json")])
    report = json.loads((tmp_path / "i.json").read_text())
    assert (report["strategy"], report["layer"]) == (summary["strategy"], summary["layer"]), inspected.output
    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["run_id"])
    assert run.data.params["auto_strategy"] == "linear" and float(run.data.params["auto_domain_gap"]) > 0
    assert "strategy.json" in [a.path for a in client.list_artifacts(summary["run_id"])]


def test_candidate_backbones_are_ranked_by_their_signals_and_the_best_is_kept(image_folder):
    from tlpipe.config import load_config
    from tlpipe.explore import inspect

    root = image_folder("data", {"cats": 6, "dogs": 6}, split={"train": 6, "val": 2})
    config = load_config("quick", num_workers=0, candidates=["efficientnet_lite0", "efficientnet_lite1"])
    result = inspect(root, config)
    ranking = result["backbone_ranking"]
    assert {r["backbone"] for r in ranking} == {"efficientnet_lite0", "efficientnet_lite1"}
    keys = [(-r["probe_accuracy"], -r["logme"]) for r in ranking]
    assert keys == sorted(keys) and result["backbone"] == ranking[0]["backbone"]


def test_a_fine_tune_that_does_not_beat_the_linear_classifier_gives_way_to_it(image_folder, tmp_path, mlflow_store):
    """auto picks full fine-tuning (small data, but a study fits the recipe's time budget, and
    ``far_gap: 0`` makes it far); on solid colours the linear classifier is already perfect on val,
    so the guard keeps it, with the pretrained weights."""
    root = image_folder("data", {"red": 6, "green": 6}, split={"train": 6, "val": 4})
    config = load_config("quick", image_size=64, num_workers=0, auto={"finetune_minutes": 30.0, "far_gap": 0.0},
                         finetune={"epochs": 1}, tuning={"trials": 2})
    result = fit(root, config, output=tmp_path / "run", experiment="guard-test")
    decision, estimate = result.summary["auto"]["decision"], result.summary["auto"]["estimate"]
    baseline = json.loads((tmp_path / "run" / "linear_baseline" / "tuning" / "tuning.json").read_text())
    assert baseline["complete"] == 2  # the linear classifier it falls back to is tuned as a linear fit's
    assert result.summary["head"]["chosen"] == baseline["best_params"]["classifier"]
    assert decision["fallback_from"] == "full" and decision["strategy"] == "linear" and decision["size"] == "small"
    assert 0 <= decision["finetune_minutes"] == estimate["finetune_study_minutes"] <= 30
    assert "within the 30-min budget" in decision["explanation"]
    assert result.summary["strategy"] == "linear" and "the linear classifier stands" in result.summary["strategy_reason"]
    bundle = load_bundle(result.bundle_path, device="cpu")
    assert bundle.manifest["codes"]["layer"] == str(decision["layer"]) and not bundle.manifest["backbone"]["embedded"]
    predicted = [p.labels[0] for p in bundle.predict([s.path for s in result.spec.splits["val"]])]
    assert predicted == [result.spec.classes[s.label] for s in result.spec.splits["val"]]


def test_a_bundle_on_concatenated_taps_predicts_what_the_fit_scored(image_folder, tmp_path, mlflow_store):
    root = image_folder("data", {"red": 6, "green": 6, "blue": 6}, split={"train": 6, "val": 3})
    config = load_config("quick", image_size=64, num_workers=0, strategy="linear", layer="penultimate+-2",
                         tuning={"trials": 0})
    result = fit(root, config, output=tmp_path / "run", experiment="concat-test")
    bundle = load_bundle(result.bundle_path, device="cpu")
    assert bundle.manifest["codes"]["layer"] == "penultimate+blocks.4"
    val = result.spec.splits["val"]
    predicted = [p.labels[0] for p in bundle.predict([s.path for s in val])]
    accuracy = sum(p == result.spec.classes[s.label] for p, s in zip(predicted, val)) / len(val)
    assert accuracy == result.summary["val_accuracy"]


def _with_confidence(sig: Signals, confidence: float | None) -> Signals:
    import dataclasses

    return dataclasses.replace(sig, imagenet_confidence={} if confidence is None else {"mean_max_prob": confidence})


@pytest.mark.parametrize("gap, confidence, far, gap_words, confidence_words", [
    (0.053, 0.72, False, "0.053 nats (at or below 0.085: near)", "0.72 (at or above 0.5: near)"),
    (0.300, 0.72, True, "0.300 nats (above 0.085: far)", "0.72 (at or above 0.5: near)"),
    (0.053, 0.31, True, "0.053 nats (at or below 0.085: near)", "0.31 (below 0.5: far)"),
    (0.085, 0.50, False, "0.085 nats (at or below 0.085: near)", "0.50 (at or above 0.5: near)"),  # on the cut: near
])
def test_the_distance_reason_says_what_the_numbers_say(gap, confidence, far, gap_words, confidence_words):
    thresholds = AutoConfig(far_gap=0.085, far_confidence=0.5)
    decision = decide(_with_confidence(signals(gap), confidence), 20, thresholds)
    assert decision.similarity == ("far" if far else "near")
    assert gap_words in decision.explanation and confidence_words in decision.explanation
    assert ("far from ImageNet." if far else "near ImageNet.") in decision.reasons[1]


def test_without_an_imagenet_head_the_gap_alone_decides_and_the_reason_says_so():
    thresholds = AutoConfig(far_gap=0.085)
    near = decide(_with_confidence(signals(0.05), None), 20, thresholds)
    far = decide(_with_confidence(signals(0.2), None), 20, thresholds)
    assert (near.similarity, far.similarity) == ("near", "far")
    assert "no pretrained ImageNet head" in near.reasons[1] and "near ImageNet" in near.reasons[1]
    assert "(above 0.085: far)" in far.reasons[1]


@pytest.mark.parametrize("per_class, words", [(149, "under 150"), (150, "at least 150"), (151, "at least 150")])
def test_the_size_reason_is_computed_from_the_count_and_its_cut(per_class, words):
    decision = decide(signals(0.05), per_class, AutoConfig(large_per_class=150, far_gap=0.085))
    assert f"{per_class} training images ({words}: {'small' if per_class < 150 else 'large'}" in decision.explanation
    assert decision.size == ("small" if per_class < 150 else "large")


def _pretrained_sha256(name: str) -> str:
    from tlpipe.models import create_backbone

    return create_backbone(name).weights.sha256


@pytest.mark.parametrize("fallback", [True, False])
def test_a_best_recipe_fit_saves_the_ranked_winner_with_or_without_a_guard_fallback(fallback, image_folder, tmp_path,
                                                                                       mlflow_store):
    """``recipes/best.yaml`` ranks its candidates; the recipe's own ``backbone`` (lite2) is left out
    of them here, so a bundle built from the recipe's name instead of the winner's would show it.
    With a fallback: auto fine-tunes (best fine-tunes from 5 images a class), the guard keeps the
    linear classifier on solid colours, and the bundle holds the winner's pretrained weights; the
    fine-tuning study (what a worker joins) was run on the winner too. Without: a linear decision."""
    from tlpipe.tuning import join_study, storage_url

    per_class = 6 if fallback else 4
    root = image_folder("data", {"red": per_class, "green": per_class}, split={"train": per_class, "val": 3})
    config = load_config("best", image_size=64, num_workers=0, candidates=["efficientnet_lite0", "efficientnet_lite1"],
                         auto={"finetune_minutes": 30.0 if fallback else 0.0}, finetune={"epochs": 1}, tuning={"trials": 1},
                         linear={"c_grid": [0.01, 0.1], "cv_folds": 2})  # the best recipe's grid costs minutes here
    result = fit(root, config, output=tmp_path / "run", experiment="best-test")
    winner = result.summary["backbone_ranking"][0]["backbone"]
    bundle = load_bundle(result.bundle_path, device="cpu")
    assert bundle.manifest["backbone"]["name"] == result.summary["backbone"]["name"] == winner
    assert bundle.manifest["backbone"]["weights"]["sha256"] == _pretrained_sha256(winner) != _pretrained_sha256("efficientnet_lite2")
    assert result.summary["strategy"] == "linear"
    assert (result.summary["auto"]["decision"]["fallback_from"] == "full") == fallback
    if fallback:
        _, study_config = join_study(storage_url(tmp_path / "run"), result.summary["tuning"]["study"])
        assert study_config.backbone == winner and study_config.strategy == "full"


def test_the_python_api_is_as_quiet_as_the_cli_unless_asked(image_folder, tmp_path, mlflow_store):
    import logging

    class Lines(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    root = image_folder("data", {"red": 4, "green": 4}, split={"train": 4, "val": 2})
    config = load_config("quick", image_size=64, num_workers=0, strategy="linear", tuning={"trials": 2})
    lines = Lines()
    logging.getLogger("optuna").addHandler(lines)
    try:
        fit(root, config, output=tmp_path / "quiet", experiment="quiet-test")
        assert not [m for m in lines.messages if "Trial 0 finished" in m]
        fit(root, config, output=tmp_path / "verbose", experiment="quiet-test", verbose=True)
        assert [m for m in lines.messages if "Trial 0 finished" in m]
    finally:
        logging.getLogger("optuna").removeHandler(lines)
