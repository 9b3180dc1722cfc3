"""The automatic strategy: the decision rule on given signals, the guard, and ``tlpipe inspect`` /
``tlpipe fit --strategy auto`` end to end on a small generated dataset."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import tree_snapshot
from tlpipe.cli import app
from tlpipe.strategy.decision import Thresholds, decide, keep_finetune, standard_error
from tlpipe.strategy.signals import Signals

THRESHOLDS = Thresholds(large_per_class=100, far_gap=0.5)


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


def test_an_earlier_stage_is_used_for_far_small_data_only_when_it_probes_clearly_better():
    assert decide(signals(0.9, last=0.70, stage=0.80), 20, THRESHOLDS).layer == "blocks.4"
    assert decide(signals(0.9, last=0.79, stage=0.80), 20, THRESHOLDS).layer == "penultimate"  # within noise
    assert decide(signals(0.2, last=0.70, stage=0.80), 20, THRESHOLDS).layer == "penultimate"  # near ImageNet


def test_the_guard_keeps_a_fine_tune_only_beyond_the_probe_noise():
    se = standard_error(0.90, 400)
    assert se == pytest.approx(0.015)
    assert keep_finetune(0.90 + 2 * se, 0.90, 400)
    assert not keep_finetune(0.90 + 0.5 * se, 0.90, 400)
    assert not keep_finetune(0.85, 0.90, 400)


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
    assert tree_snapshot(root) == before


def test_fit_auto_logs_the_decision_to_mlflow(image_folder, tmp_path, mlflow_store):
    root = image_folder("data", {"cats": 8, "dogs": 8}, split={"train": 8, "val": 3})
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["fit", str(root), "--recipe", "quick", "--workers", "0", "--output", str(out),
                                      "--experiment", "auto-test"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "linear" and "training images" in summary["strategy_reason"]
    assert summary["timings"]["decide"] < summary["timings"]["extract_codes"] + summary["timings"]["train"]
    client = MlflowClient(mlflow_store)
    run = client.get_run(summary["run_id"])
    assert run.data.params["auto_strategy"] == "linear" and float(run.data.params["auto_domain_gap"]) > 0
    assert "strategy.json" in [a.path for a in client.list_artifacts(summary["run_id"])]


def test_candidate_backbones_are_ranked_by_their_signals_and_the_best_is_kept(image_folder):
    from tlpipe.config import load_config
    from tlpipe.pipeline import inspect

    root = image_folder("data", {"cats": 6, "dogs": 6}, split={"train": 6, "val": 2})
    config = load_config("quick", num_workers=0, candidates=["efficientnet_lite0", "efficientnet_lite1"])
    result = inspect(root, config)
    ranking = result["backbone_ranking"]
    assert {r["backbone"] for r in ranking} == {"efficientnet_lite0", "efficientnet_lite1"}
    keys = [(-r["probe_accuracy"], -r["logme"]) for r in ranking]
    assert keys == sorted(keys) and result["backbone"] == ranking[0]["backbone"]
