"""The record stage of ``fit``: what a finished fit leaves behind, in one place.

Under ``<output>``: the bundle (``model/``), ``classification_report.json``, ``confusion_matrix.png``,
``learning_curves.png`` (fine-tunes), ``strategy.json`` (auto), and ``summary.json`` last, so a
summary on disk means the rest is there. The same go to the fit's MLflow run, with the params
and metrics a reader compares runs by.

A fit records twice when it fine-tunes: first its linear classifier (``status: provisional``),
then the final model, whose bundle replaces the first in two renames that no signal splits;
after SIGTERM or Ctrl+C the summary says ``status: cut`` beside the best model saved by then.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tlpipe import __version__
from tlpipe.budget import signals_held
from tlpipe.bundle import save_bundle
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.metrics import classification_metrics, save_confusion_matrix, save_learning_curves
from tlpipe.models import Backbone, resolve_layer
from tlpipe.strategy.auto import Assessment
from tlpipe.strategy.decision import Decision
from tlpipe.tracking import FitRun
from tlpipe.training.strategies import TrainedHead
from tlpipe.utils import read_json, write_json

SUMMARY = "summary.json"
BUNDLE = "model"
STATUS_TAG = "tlpipe_status"  # on the fit's MLflow run: provisional, cut or complete


@dataclass
class FitResult:
    output_dir: Path
    bundle_path: Path
    run_id: str | None
    summary: dict
    spec: DatasetSpec
    metrics: dict


@dataclass
class FittedModel:
    """What the training stages hand the record stage: the model as it will be saved."""

    config: FitConfig  # resolved: strategy, tap, the best trial's hyperparameters
    backbone: Backbone
    trained: TrainedHead
    val_codes: tuple  # the val split's codes through the prediction path, and labels
    tuning: dict  # the study's summary
    decision: Decision | None = None  # auto: every reason, the guard's last


def record(out: Path, data: Path, spec: DatasetSpec, model: FittedModel, run: FitRun, timings: dict,
           assessment: Assessment | None = None, ranking: list[dict] | None = None, *, status: str = "complete",
           cut: str | None = None, plan: dict | None = None, budget: dict | None = None) -> FitResult:
    """Save the bundle and the reports under ``out``, log them to ``run``, write ``summary.json``.
    ``status``: complete, provisional (a fine-tune still to come: the status and summary are
    logged, no params or metrics), or cut (``cut``: why; the run is tagged, its params left as
    they were). SIGTERM and Ctrl+C wait until the record is whole."""
    with signals_held():
        return _record(out, data, spec, model, run, timings, assessment, ranking, status, cut, plan, budget)


def _record(out, data, spec, model, run, timings, assessment, ranking, status, cut, plan, budget) -> FitResult:
    X_val, y_val = model.val_codes
    metrics = classification_metrics(y_val, model.trained.head.predict(X_val), spec.classes)
    layer = resolve_layer(model.backbone.model, model.config.layer)
    bundle = out / BUNDLE
    if status != "cut":  # a cut keeps the bundle already saved
        _replace_folder(bundle, lambda path: save_bundle(
            path, model.backbone, model.trained.head, spec.classes, layer=layer, layer_relu=model.config.layer_relu,
            config=model.config.model_dump(mode="json"), metrics={"val_accuracy": metrics["accuracy"]},
            trained=model.trained.backbone_trained))
    artifacts = _write_reports(out, spec, model, metrics, assessment, ranking)
    summary = {"status": status, **({"cut": cut} if cut else {}),
               **_summary(data, spec, model, layer, run, metrics, timings, bundle, assessment, ranking),
               **({"plan": plan} if plan else {}), **({"budget": budget} if budget else {})}
    run.log_batch(tags={STATUS_TAG: status, **({"tlpipe_cut": cut} if cut else {})})
    if status == "complete":
        _log_run(run, out, model, metrics, timings, artifacts, bundle)
    elif status == "cut" and bundle.exists():
        run.log_artifact(bundle, "model")
    write_json(out / SUMMARY, summary)
    run.log_artifact(out / SUMMARY)
    return FitResult(out, bundle, run.run_id, summary, spec, metrics)


def write_cut_summary(out: Path, reason: str, timings: dict, run: FitRun) -> Path | None:
    """The summary of a fit cut before this run saved a model: the bundle an earlier run of the
    same fit left, if any. Returns that bundle."""
    bundle = out / BUNDLE if (out / BUNDLE).is_dir() else None
    with signals_held():
        run.log_batch(tags={STATUS_TAG: "cut", "tlpipe_cut": reason})
        write_json(out / SUMMARY, {"status": "cut", "cut": reason, "bundle": bundle and str(bundle.resolve()),
                                   "run_id": run.run_id, "tracking_uri": run.tracking_uri, "timings": timings,
                                   "tlpipe_version": __version__})
        run.log_artifact(out / SUMMARY)
    return bundle


def previous_status(out: Path) -> str | None:
    """The status an earlier run of this fit left in ``summary.json`` (None: no summary)."""
    path = Path(out) / SUMMARY
    try:
        return read_json(path).get("status", "complete") if path.exists() else None
    except ValueError:  # a summary is written atomically; a foreign file is not ours to trust
        return None


def _replace_folder(target: Path, write) -> None:
    """``write(folder)`` into a staging folder, then swap it for ``target`` in two renames that
    SIGTERM and Ctrl+C wait for: ``target`` is always the old folder whole or the new one whole."""
    staging, old = target.with_name(f".{target.name}.staging"), target.with_name(f".{target.name}.old")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    with signals_held():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_bundle(out: Path) -> None:
    """Put back the bundle a fit killed (SIGKILL) between ``_replace_folder``'s two renames left aside."""
    target, old = Path(out) / BUNDLE, Path(out) / f".{BUNDLE}.old"
    if old.is_dir() and not target.exists():
        os.replace(old, target)


def _write_reports(out: Path, spec: DatasetSpec, model: FittedModel, metrics: dict,
                   assessment: Assessment | None, ranking: list[dict] | None) -> list[str]:
    """The report files beside the bundle; returns their names, for the MLflow run."""
    write_json(out / "classification_report.json", metrics)
    save_confusion_matrix(metrics["confusion_matrix"], spec.classes, out / "confusion_matrix.png")
    artifacts = ["confusion_matrix.png", "classification_report.json", "quarantine.csv", "config.yaml"]
    if assessment:
        write_json(out / "strategy.json", {**_auto(assessment, model.decision), "backbone_ranking": ranking or []})
        artifacts.append("strategy.json")
    if model.trained.history:
        save_learning_curves(model.trained.history, out / "learning_curves.png")
        artifacts.append("learning_curves.png")
    return artifacts


def _auto(assessment: Assessment, decision: Decision | None) -> dict:
    """The assessment with the final decision (the guard's reason included)."""
    return {**assessment.to_dict(), "decision": (decision or assessment.decision).to_dict()}


def _summary(data: Path, spec: DatasetSpec, model: FittedModel, layer: str, run: FitRun, metrics: dict,
             timings: dict, bundle: Path, assessment: Assessment | None, ranking: list[dict] | None) -> dict:
    backbone, decision = model.backbone, model.decision
    return {
        "run_id": run.run_id, "tracking_uri": run.tracking_uri, "experiment": run.experiment,
        "tlpipe_version": __version__, "data": str(data.resolve()),
        "strategy": model.config.strategy, "layer": layer,
        "strategy_reason": decision.explanation if decision else "asked for (--strategy or the recipe)",
        **({"auto": _auto(assessment, decision)} if assessment else {}),
        **({"backbone_ranking": ranking} if ranking else {}),
        "head": model.trained.details,
        "backbone": {"name": backbone.name, "arch": backbone.arch, **backbone.weights.to_dict()},
        "splits": spec.counts(), "val_from": spec.val_from, "classes": spec.classes,
        "quarantined": len(spec.quarantined), "skipped": dict(spec.skipped),
        "metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
        "val_accuracy": metrics["accuracy"],
        "tuning": model.tuning, "timings": timings, "bundle": str(bundle.resolve()),
    }


def _log_run(run: FitRun, out: Path, model: FittedModel, metrics: dict, timings: dict, artifacts: list[str],
             bundle: Path) -> None:
    run.log_metrics({"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
                     **{f"val_f1_{c}": m["f1"] for c, m in metrics["per_class"].items()},
                     **{f"seconds_{k}": v for k, v in timings.items()}},
                    step=len(model.trained.history))
    run.log_params({f"result_{k}": v for k, v in model.trained.details.items() if not isinstance(v, dict)})
    if model.decision is not None:
        run.log_params({"result_strategy": model.config.strategy, "result_layer": model.config.layer})
    for name in artifacts:
        run.log_artifact(out / name)
    run.log_artifact(bundle, "model")
