"""The record stage of ``fit``: what a finished fit leaves behind, in one place (the folder and
its file names belong to ``tlpipe.run.folder.RunFolder``; this module writes the record into it).

Under ``<output>``: the bundle (``model/``), ``classification_report.json``, ``confusion_matrix.png``,
``learning_curves.png`` (fine-tunes), ``strategy.json`` (auto), and ``summary.json`` last, so a
summary on disk means the rest is there. The same go to the fit's MLflow run, with the params
and metrics a reader compares runs by.

A fit records twice when it fine-tunes: first its linear classifier (``status: provisional``),
then the final model, whose bundle replaces the first in two renames that no signal splits (the
summary naming it staged first, so even a SIGKILL leaves a folder the next start makes whole);
after SIGTERM or Ctrl+C the summary says ``status: cut`` beside the best model saved by then.
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tlpipe.version import __version__
from tlpipe.budget import signals_held
from tlpipe.bundle.folder import save_bundle
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.data.source import DataSource
from tlpipe.data.table import LABEL_DELIMITER
from tlpipe.errors import TlpipeError
from tlpipe.insight.diagnosis import Diagnosis
from tlpipe.bundle.unknowns import UnknownDetector
from tlpipe.run.html_report import write_html_report
from tlpipe.bundle.metrics import (
    evaluation_metrics, headline, multilabel_metrics, save_confusion_matrix, save_pr_curves, save_learning_curves, save_data_curve, save_reliability_diagram,
)
from tlpipe.models import Backbone, resolve_layer
from tlpipe.run.folder import RunFolder, bundle_identity
from tlpipe.strategy.auto import Assessment
from tlpipe.strategy.decision import Decision
from tlpipe.run.tracking import FitRun
from tlpipe.training.fits import TrainedHead
from tlpipe.utils import atomic_write, write_json

STATUS_TAG = "tlpipe_status"  # on the fit's MLflow run: provisional, cut or complete
ASKED_FOR = "asked for (--strategy or the recipe)"  # why a strategy the user named was trained
CUT_TAG, STAGE_TAG = "tlpipe_cut", "tlpipe_stage"  # on a cut run: why, and in which stage; gone once it completes
WARNINGS_TAG = "tlpipe_warnings"  # on a run whose fit is whole but some part of its record is not


@dataclass(frozen=True)
class FitResult:
    output_dir: Path
    bundle_path: Path
    run_id: str | None
    summary: dict
    spec: DatasetSpec
    metrics: dict


@dataclass(frozen=True)
class FittedModel:
    """What the training stages hand the record stage: the model as it will be saved."""

    config: FitConfig  # resolved: strategy, tap, the best trial's hyperparameters
    backbone: Backbone
    trained: TrainedHead
    val_codes: tuple  # the val split's codes through the prediction path, and labels
    tuning: dict  # the study's summary
    decision: Decision | None = None  # auto: every reason, the guard's last
    unknowns: UnknownDetector | None = None  # the check stage's: when an image is of no class it knows
    diagnosis: Diagnosis | None = None  # the check stage's label suspects on a fine-tuned network's codes


def record(out: Path, data: DataSource, spec: DatasetSpec, model: FittedModel, run: FitRun, timings: dict,
           assessment: Assessment | None = None, ranking: list[dict] | None = None, *, status: str = "complete",
           cut: str | None = None, plan: dict | None = None, budget: dict | None = None,
           diagnosis: Diagnosis | None = None, register: tuple[str, str | None] | None = None) -> FitResult:
    """Save the bundle and the reports under ``out``, log them to ``run``, write ``summary.json``.
    ``status``: complete, provisional (a fine-tune still to come: the status and summary are
    logged, no params or metrics), or cut (``cut``: why; the run is tagged, its params left as
    they were). ``register``: (name, alias) for a complete fit's MLflow model in the registry.
    SIGTERM and Ctrl+C wait until the record is whole."""
    with signals_held():
        result = _record(out, data, spec, model, run, timings, assessment, ranking, status, cut, plan, budget, diagnosis)
    if status == "complete":  # once the fit is over, outside the held signals: a stop here loses neither
        result = warned(result, run, result.summary, _without_unknowns(model))
        result = warned(result, run, *_scored_test(result, run, model.config.device))
        result = warned(result, run, *_with_mlflow_model(run, result))
        if register:  # in the summary that the page and the run's copy show
            result = warned(result, run, _registered(result, *register), None)
        if page_failed := _write_report_page(out, spec, run):
            result = warned(result, run, result.summary, page_failed)
        run.log_artifact(out / RunFolder.SUMMARY)  # the run's copy, once every step is in (a cut logs its own)
    return result


def warned(result: FitResult, run: FitRun, summary: dict, warning: str | None) -> FitResult:
    """``result`` with ``summary``, written (a stop before the next step keeps it), and ``warning`` told
    the one way a degraded result is (the fit itself is whole): the summary's ``warnings``, which the
    report prints, and the run's ``tlpipe_warnings`` tag."""
    if warning:
        summary = {**summary, "warnings": [*summary.get("warnings", []), warning]}
        run.log_batch(tags={WARNINGS_TAG: " | ".join(summary["warnings"])})
    write_json(result.output_dir / RunFolder.SUMMARY, summary)
    return replace(result, summary=summary)


def _without_unknowns(model: FittedModel) -> str | None:
    """Why the model has no unknown-image detector, when the check stage said (the train pass did not
    fit the time left, or no class has two train images to measure a spread by)."""
    note = None if model.unknowns else model.trained.details.get("unknowns", {}).get("note")
    return note and f"no unknown-image detector in this model ({note}): predict answers a class for every image"


def _scored_test(result: FitResult, run: FitRun, device: str) -> tuple[dict, str | None]:
    """The summary with the test/ split scored once, at the end, through the saved bundle: the one
    figure no choice of the fit saw, which the summary, the printed report and the page lead with;
    and what went wrong when it could not be (the fit itself is whole)."""
    if "test" not in result.spec.splits:
        return result.summary, None
    from tlpipe.bundle.evaluation import score_split
    from tlpipe.bundle.folder import load_bundle

    try:
        metrics = score_split(load_bundle(result.bundle_path, device), result.spec, "test")
    except Exception as exc:  # noqa: BLE001 - the model and its val figures are saved
        return result.summary, f"the test split was not scored ({type(exc).__name__}: {str(exc)[:200]}); `tlpipe evaluate` scores it"
    summary = {**result.summary, "test": {k: v for k, v in metrics.items() if k != "confusion_matrix"}}
    name, value = headline(metrics)
    run.log_metrics({name.replace("val_", "test_"): value})
    return {**summary, "score": score_line(summary)}, None


def score_line(summary: dict) -> dict:
    """The figure a fit is summed up by, and what it is worth: test/ when the data has one (scored
    once, after every choice), else val, which chose the model's settings and so flatters it."""
    multilabel = summary.get("task") == "multilabel"
    name, key = ("mAP", "mean_average_precision") if multilabel else ("accuracy", "accuracy")
    if "test" in summary:
        test = summary["test"]
        return {"split": "test", "metric": name, "value": test[key], "interval": test.get(f"{key}_ci"),
                "note": f"on {test['n_images']} test images, scored once after every choice was made"}
    return {"split": "val", "metric": name, "value": summary["metrics"][key], "interval": summary["metrics"].get(f"{key}_ci"),
            "note": "on val, which chose the model's settings (strategy, layer, hyperparameters, calibration): "
                    "it flatters the model; a test/ split beside train/ is scored once, at the end"}


def _write_report_page(out: Path, spec: DatasetSpec, run: FitRun) -> str | None:
    """report.html, logged to the run; what went wrong when it could not be (the page is a nicety)."""
    try:
        run.log_artifact(write_html_report(out, spec))
    except Exception as exc:  # noqa: BLE001 - the model and summary are saved
        return f"report.html not written ({type(exc).__name__}: {exc}); `tlpipe report {out}` retries"
    return None


def _record(out, data, spec, model, run, timings, assessment, ranking, status, cut, plan, budget, diagnosis) -> FitResult:
    X_val, y_val = model.val_codes
    head = model.trained.head
    probabilities = head.predict_proba(X_val)
    metrics = multilabel_metrics(y_val, probabilities, head.thresholds, spec.classes) if head.multilabel else \
        evaluation_metrics(y_val, probabilities, spec.classes)
    layer = resolve_layer(model.backbone.model, model.config.layer)
    folder = RunFolder(out)
    bundle = folder.bundle
    staging = None if status == "cut" else folder.stage_bundle(lambda path: save_bundle(  # a cut keeps the bundle saved
        path, model.backbone, model.trained.head, spec.classes, layer=layer, layer_relu=model.config.layer_relu,
        config=model.config.model_dump(mode="json"), metrics=dict([headline(metrics)]),
        trained=model.trained.backbone_trained, hflip=model.trained.hflip, unknowns=model.unknowns,
        fit_images=spec.fit_image_hashes))
    reports = folder / folder.STAGED_REPORTS
    shutil.rmtree(reports, ignore_errors=True)
    artifacts = _write_reports(reports, spec, model, metrics, probabilities, assessment, ranking, diagnosis)
    summary = {"status": status, **({"cut": cut} if cut else {}),
               **_summary(data, spec, model, layer, run, metrics, timings, bundle, assessment, ranking),
               "bundle_sha256": bundle_identity(staging or bundle),
               **({"mlflow_model": f"runs:/{run.run_id}/model"} if status == "complete" else {}),  # logged after (record)
               **({"plan": plan} if plan else {}), **({"budget": budget} if budget else {}),
               **(diagnosis.to_dict() if diagnosis else {})}
    summary["score"] = score_line(summary)
    # Two-phase: the new bundle, reports and the summary naming the bundle are all staged first; a
    # SIGKILL while they are moved in is finished by RunFolder.restore on the next start, never left half.
    write_json(folder / folder.STAGED_SUMMARY, summary)
    if staging:
        folder.swap_bundle(staging)
    folder.commit_staged()
    run.log_batch(tags={STATUS_TAG: status, **({CUT_TAG: cut} if cut else {})})
    if status != "cut":
        run.delete_tags(CUT_TAG, STAGE_TAG)
    if status == "complete":
        _log_run(run, out, model, metrics, timings, artifacts)
    run.log_artifact(folder / folder.SUMMARY)
    return FitResult(out, bundle, run.run_id, summary, spec, metrics)


def write_cut_summary(out: Path, reason: str, timings: dict, run: FitRun) -> Path | None:
    """The summary of a fit cut before this run saved a model: the bundle an earlier run of the
    same fit left, if any. Returns that bundle. An earlier run's complete record of that bundle
    stays whole (a re-run for more trials, cut, leaves the finished fit as it was), the cut beside it."""
    folder = RunFolder(out)
    bundle = folder.bundle if folder.bundle.is_dir() else None
    cut = {"cut": reason, "run_id": run.run_id, "tracking_uri": run.tracking_uri, "timings": timings}
    summary = folder.read_summary() if folder.previous_status() == "complete" else {}
    finished = bundle is not None and summary.get("bundle_sha256") == bundle_identity(bundle)
    with signals_held():
        run.log_batch(tags={STATUS_TAG: "cut", CUT_TAG: reason})
        write_json(folder / folder.SUMMARY, {**summary, "last_cut": cut} if finished else
                   {"status": "cut", **cut, "bundle": bundle and str(bundle.resolve()),
                    "bundle_sha256": bundle and bundle_identity(bundle), "tlpipe_version": __version__})
        run.log_artifact(folder / folder.SUMMARY)
    return bundle


def _write_reports(out: Path, spec: DatasetSpec, model: FittedModel, metrics: dict, probabilities: np.ndarray,
                   assessment: Assessment | None, ranking: list[dict] | None, diagnosis: Diagnosis | None) -> list[str]:
    """The report files of a record, into ``out`` (the staging folder); returns the names the MLflow
    run gets (quarantine.csv and config.yaml, written by the data stage, with them)."""
    names = RunFolder
    write_json(out / names.CLASSIFICATION_REPORT, metrics)
    artifacts = [names.CLASSIFICATION_REPORT, names.VAL_PREDICTIONS, names.QUARANTINE, names.CONFIG]
    if spec.multilabel:
        _write_val_label_sets(out / names.VAL_PREDICTIONS, spec, probabilities, model.trained.head.thresholds)
        save_pr_curves(model.val_codes[1], probabilities, spec.classes, out / names.PR_CURVES)
        artifacts.append(names.PR_CURVES)
    else:
        save_confusion_matrix(metrics["confusion_matrix"], spec.classes, out / names.CONFUSION_MATRIX)
        save_reliability_diagram(probabilities, model.val_codes[1], out / names.RELIABILITY)
        _write_val_predictions(out / names.VAL_PREDICTIONS, spec, probabilities)
        artifacts += [names.CONFUSION_MATRIX, names.RELIABILITY]
    if assessment:
        write_json(out / names.STRATEGY, {**_auto(assessment, model.decision), "backbone_ranking": ranking or []})
        artifacts.append(names.STRATEGY)
    if diagnosis and diagnosis.label_issues is not None:
        _write_label_issues(out / names.LABEL_ISSUES, spec, diagnosis)
        artifacts.append(names.LABEL_ISSUES)
    if diagnosis and diagnosis.learning_curve is not None:
        save_data_curve(diagnosis.learning_curve.to_dict(), out / names.DATA_CURVE)
        artifacts.append(names.DATA_CURVE)
    if model.trained.history:
        save_learning_curves(model.trained.history, out / names.LEARNING_CURVES, "mAP" if spec.multilabel else "accuracy")
        artifacts.append(names.LEARNING_CURVES)
    return artifacts


def _write_val_predictions(path: Path, spec: DatasetSpec, probabilities: np.ndarray) -> None:
    """Each val image (relative to the dataset), its class, the predicted class and its probability:
    what the report's grid of confident mistakes is drawn from."""
    rows = [["path", "true", "predicted", "probability"]]
    for sample, p in zip(spec.splits["val"], probabilities):
        rows.append([spec.relative(sample.path), spec.classes[sample.label], spec.classes[int(p.argmax())], f"{p.max():.6f}"])
    atomic_write(path, lambda f: csv.writer(f).writerows(rows), newline="", encoding="utf-8")


def _named(spec: DatasetSpec, label) -> str:
    """A label as the files write it: the class's name, or a multi-label 0/1 row's names joined by ``;``."""
    if spec.multilabel:
        return LABEL_DELIMITER.join(c for c, yes in zip(spec.classes, label) if yes)
    return spec.classes[int(label)]


def _write_label_issues(path: Path, spec: DatasetSpec, diagnosis: Diagnosis) -> None:
    """The train images whose label the codes contradict, most suspect first: the path (relative to
    the dataset), the label given, the class the codes suggest (multi-label: the sets, joined by
    ``;``), and the label quality in [0, 1]."""
    issues = diagnosis.label_issues
    rows = [["path", "given", "suggested", "quality"]]
    for sample, suggested, quality in zip(diagnosis.suspects, issues.suggested, issues.quality):
        rows.append([spec.relative(sample.path), _named(spec, sample.label), _named(spec, suggested), f"{quality:.6f}"])
    atomic_write(path, lambda f: csv.writer(f).writerows(rows), newline="", encoding="utf-8")


def _write_val_label_sets(path: Path, spec: DatasetSpec, probabilities: np.ndarray, thresholds: np.ndarray) -> None:
    """A multi-label model's val images: the true and the predicted classes (joined by ``;``) and
    every class's probability, in the classes' order (columns ``RunFolder.VAL_PROBABILITY`` + the
    class, so no class name can stand for another column)."""
    rows = [["path", "true", "predicted", *(f"{RunFolder.VAL_PROBABILITY}{c}" for c in spec.classes)]]
    for sample, p in zip(spec.splits["val"], probabilities):
        rows.append([spec.relative(sample.path), _named(spec, sample.label), _named(spec, p >= thresholds),
                     *(f"{v:.6f}" for v in p)])
    atomic_write(path, lambda f: csv.writer(f).writerows(rows), newline="", encoding="utf-8")


def _auto(assessment: Assessment, decision: Decision | None) -> dict:
    """The assessment with the final decision (the guard's reason included)."""
    return {**assessment.to_dict(), "decision": (decision or assessment.decision).to_dict()}


def _summary(data: DataSource, spec: DatasetSpec, model: FittedModel, layer: str, run: FitRun, metrics: dict,
             timings: dict, bundle: Path, assessment: Assessment | None, ranking: list[dict] | None) -> dict:
    backbone, decision = model.backbone, model.decision
    return {
        "run_id": run.run_id, "tracking_uri": run.tracking_uri, "experiment": run.experiment,
        "tlpipe_version": __version__, **data.record(), "data_root": str(spec.root.resolve()),
        "strategy": model.config.strategy, "layer": layer,
        "strategy_reason": decision.explanation if decision else ASKED_FOR,
        **({"auto": _auto(assessment, decision)} if assessment else {}),
        **({"backbone_ranking": ranking} if ranking else {}),
        "head": model.trained.details,
        "backbone": {"name": backbone.name, "arch": backbone.arch, **backbone.weights.to_dict()},
        "splits": spec.counts(), "val_from": spec.val_from, "classes": spec.classes,
        "quarantined": len(spec.quarantined), "skipped": dict(spec.skipped), "data_notes": spec.notes,
        "task": "multilabel" if spec.multilabel else "multiclass",
        "metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
        **dict([headline(metrics)]),
        "tuning": model.tuning, "timings": timings, "bundle": str(bundle.resolve()),
        "unknowns": model.unknowns.to_dict() if model.unknowns else
        {"note": model.trained.details.get("unknowns", {}).get("note", "no unknown rejection in this model")},
    }


def _log_run(run: FitRun, out: Path, model: FittedModel, metrics: dict, timings: dict, artifacts: list[str]) -> None:
    calibration = model.trained.details.get("calibration", {})
    multilabel = {"val_micro_f1": metrics["micro_f1"], "val_subset_accuracy": metrics["subset_accuracy"],
                  **{f"val_ap_{c}": m["average_precision"] for c, m in metrics["per_class"].items()}} \
        if metrics.get("task") == "multilabel" else {}
    run.log_metrics({**dict([headline(metrics)]), "val_macro_f1": metrics["macro_f1"], **multilabel,
                     **{f"val_{k}": v for k, v in calibration.items() if k.startswith(("nll", "ece"))},
                     **({"temperature": calibration["temperature"]} if "temperature" in calibration else {}),
                     **{f"val_f1_{c}": m["f1"] for c, m in metrics["per_class"].items()},
                     **{f"seconds_{k}": v for k, v in timings.items()}},
                    step=len(model.trained.history))
    run.log_params({f"result_{k}": v for k, v in model.trained.details.items() if not isinstance(v, dict)})
    if model.decision is not None:
        run.log_params({"result_strategy": model.config.strategy, "result_layer": model.config.layer})
    for name in artifacts:
        run.log_artifact(out / name)


def _registered(result: FitResult, name: str, alias: str | None) -> dict:
    """The summary with the fit's MLflow model as a new version of ``name`` in the registry, ``alias``
    moved to it; or why the registry refused (the fit is whole: ``tlpipe fit`` prints its report, then that)."""
    from tlpipe.bundle.registry import register_model

    try:
        version = register_model(result.run_id, result.summary["tracking_uri"], name, alias)
        outcome = {"name": name, "version": version, "alias": alias}
    except Exception as exc:  # noqa: BLE001 - the fit is whole; the registry is one more place for its model
        outcome = {"name": name, "error": str(exc) if isinstance(exc, TlpipeError) else
                   f"the registry refused the model ({type(exc).__name__}: {str(exc)[:200]})"}
    return {**result.summary, "registered": outcome}


def _with_mlflow_model(run: FitRun, result: FitResult) -> tuple[dict, str | None]:
    """The bundle as the run's MLflow model (``runs:/<id>/model``): the summary with its stored code's
    checksum (``tlpipe serve OUTPUT`` trusts this copy, not the store's). A failure leaves the fit
    whole: the summary without the model, and what went wrong."""
    from tlpipe.bundle.serving import log_model

    try:
        return {**result.summary, "mlflow_code_sha256": log_model(run, result.bundle_path)}, None
    except Exception as exc:  # noqa: BLE001 - the bundle and summary are saved: the MLflow model is one more copy
        return ({k: v for k, v in result.summary.items() if k != "mlflow_model"},
                f"the MLflow model was not logged ({type(exc).__name__}: {str(exc)[:200]}); "
                f"the bundle {result.bundle_path} predicts as it is")
