"""The record stage of ``fit``: what a finished fit leaves behind, in one place.

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
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np
from filelock import FileLock, Timeout

from tlpipe import __version__
from tlpipe.budget import signals_held
from tlpipe.bundle import save_bundle
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec
from tlpipe.errors import TlpipeError
from tlpipe.html_report import SUMMARY, VAL_PREDICTIONS, write_html_report  # the names the report reads
from tlpipe.progress import announce
from tlpipe.metrics import evaluation_metrics, save_confusion_matrix, save_learning_curves, save_reliability_diagram
from tlpipe.models import Backbone, resolve_layer
from tlpipe.paths import output_folder, sweep_temporaries
from tlpipe.strategy.auto import Assessment
from tlpipe.strategy.decision import Decision
from tlpipe.tracking import FitRun
from tlpipe.training.strategies import TrainedHead
from tlpipe.utils import atomic_write, read_json, write_json

STAGED_SUMMARY = ".summary.json.staged"  # the next summary, written before its bundle is swapped in
STAGED_REPORTS = ".reports.staging"  # the next record's reports, moved in with it
BUNDLE = "model"
STATUS_TAG = "tlpipe_status"  # on the fit's MLflow run: provisional, cut or complete
ASKED_FOR = "asked for (--strategy or the recipe)"  # why a strategy the user named was trained
CUT_TAG, STAGE_TAG = "tlpipe_cut", "tlpipe_stage"  # on a cut run: why, and in which stage; gone once it completes
OWNER = ".tlpipe-fit.json"  # whose folder this is: the fit's data and config key, its process, its MLflow run
LOCK = ".tlpipe.lock"  # held while a fit writes here; the OS releases it when the process dies


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
        result = _record(out, data, spec, model, run, timings, assessment, ranking, status, cut, plan, budget)
    if status == "complete":  # once the fit is over, outside the held signals: a stop here loses neither
        _log_mlflow_model(run, result)
        _write_report_page(out, spec, run)
    return result


def _write_report_page(out: Path, spec: DatasetSpec, run: FitRun) -> None:
    """report.html, logged to the run; a failure here leaves the fit whole, and says so in one line."""
    try:
        run.log_artifact(write_html_report(out, spec))
    except Exception as exc:  # noqa: BLE001 - the model and summary are saved: the page is a nicety
        announce(f"[yellow]Note[/] report.html not written ({type(exc).__name__}: {exc}); `tlpipe report {out}` retries")


def _record(out, data, spec, model, run, timings, assessment, ranking, status, cut, plan, budget) -> FitResult:
    X_val, y_val = model.val_codes
    probabilities = model.trained.head.predict_proba(X_val)
    metrics = evaluation_metrics(y_val, probabilities, spec.classes)
    layer = resolve_layer(model.backbone.model, model.config.layer)
    bundle = out / BUNDLE
    staging = None if status == "cut" else _stage_folder(bundle, lambda path: save_bundle(  # a cut keeps the bundle saved
        path, model.backbone, model.trained.head, spec.classes, layer=layer, layer_relu=model.config.layer_relu,
        config=model.config.model_dump(mode="json"), metrics={"val_accuracy": metrics["accuracy"]},
        trained=model.trained.backbone_trained, hflip=model.trained.details.get("test_time", {}).get("hflip", False)))
    reports = out / STAGED_REPORTS
    shutil.rmtree(reports, ignore_errors=True)
    artifacts = _write_reports(reports, spec, model, metrics, probabilities, assessment, ranking)
    summary = {"status": status, **({"cut": cut} if cut else {}),
               **_summary(data, spec, model, layer, run, metrics, timings, bundle, assessment, ranking),
               "bundle_sha256": bundle_identity(staging or bundle),
               **({"mlflow_model": f"runs:/{run.run_id}/model"} if status == "complete" else {}),  # logged after (record)
               **({"plan": plan} if plan else {}), **({"budget": budget} if budget else {})}
    # Two-phase: the new bundle, reports and the summary naming the bundle are all staged first; a
    # SIGKILL while they are moved in is finished by restore_bundle on the next start, never left half.
    write_json(out / STAGED_SUMMARY, summary)
    if staging:
        _swap_folder(staging, bundle)
    _commit_staged(out)
    run.log_batch(tags={STATUS_TAG: status, **({CUT_TAG: cut} if cut else {})})
    if status != "cut":
        run.delete_tags(CUT_TAG, STAGE_TAG)
    if status == "complete":
        _log_run(run, out, model, metrics, timings, artifacts)
    run.log_artifact(out / SUMMARY)
    return FitResult(out, bundle, run.run_id, summary, spec, metrics)


def bundle_identity(bundle: Path) -> str | None:
    """What tells one saved bundle from another: its head file's checksum, as bundle.json records it."""
    try:
        return read_json(Path(bundle) / "bundle.json")["head"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cut_summary(out: Path, reason: str, timings: dict, run: FitRun) -> Path | None:
    """The summary of a fit cut before this run saved a model: the bundle an earlier run of the
    same fit left, if any. Returns that bundle."""
    bundle = out / BUNDLE if (out / BUNDLE).is_dir() else None
    with signals_held():
        run.log_batch(tags={STATUS_TAG: "cut", CUT_TAG: reason})
        write_json(out / SUMMARY, {"status": "cut", "cut": reason, "bundle": bundle and str(bundle.resolve()),
                                   "bundle_sha256": bundle and bundle_identity(bundle),
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


def _stage_folder(target: Path, write) -> Path:
    """``write(folder)`` into ``target``'s staging folder, returned for ``_swap_folder``."""
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    return staging


def _swap_folder(staging: Path, target: Path) -> None:
    """``staging`` in place of ``target`` in two renames that SIGTERM and Ctrl+C wait for: ``target``
    is always the old folder whole or the new one whole (``restore_bundle`` undoes a SIGKILL between)."""
    old = target.with_name(f".{target.name}.old")
    with signals_held():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_bundle(out: Path) -> None:
    """Make the output folder whole after a SIGKILL in the record stage: put back the bundle killed
    between ``_swap_folder``'s two renames, and finish the summary of a bundle that was swapped in
    just before (the staged summary names it), or drop a staged summary whose bundle never came."""
    out = Path(out)
    target, old, staged = out / BUNDLE, out / f".{BUNDLE}.old", out / STAGED_SUMMARY
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    if staged.exists():
        try:
            names = read_json(staged).get("bundle_sha256")
        except ValueError:
            names = None
        if names is not None and names == bundle_identity(target):
            _commit_staged(out)
            return
        staged.unlink()
    shutil.rmtree(out / STAGED_REPORTS, ignore_errors=True)


def _commit_staged(out: Path) -> None:
    """Move the staged reports into ``out``, then the staged summary: the summary, last, says the rest is in."""
    reports = out / STAGED_REPORTS
    if reports.is_dir():
        for path in reports.iterdir():
            os.replace(path, out / path.name)
        reports.rmdir()
    os.replace(out / STAGED_SUMMARY, out / SUMMARY)


def _write_reports(out: Path, spec: DatasetSpec, model: FittedModel, metrics: dict, probabilities: np.ndarray,
                   assessment: Assessment | None, ranking: list[dict] | None) -> list[str]:
    """The report files of a record, into ``out`` (the staging folder); returns the names the MLflow
    run gets (quarantine.csv and config.yaml, written by the data stage, with them)."""
    write_json(out / "classification_report.json", metrics)
    save_confusion_matrix(metrics["confusion_matrix"], spec.classes, out / "confusion_matrix.png")
    save_reliability_diagram(probabilities, model.val_codes[1], out / "reliability.png")
    _write_val_predictions(out / VAL_PREDICTIONS, spec, probabilities)
    artifacts = ["confusion_matrix.png", "reliability.png", "classification_report.json", VAL_PREDICTIONS,
                 "quarantine.csv", "config.yaml"]
    if assessment:
        write_json(out / "strategy.json", {**_auto(assessment, model.decision), "backbone_ranking": ranking or []})
        artifacts.append("strategy.json")
    if model.trained.history:
        save_learning_curves(model.trained.history, out / "learning_curves.png")
        artifacts.append("learning_curves.png")
    return artifacts


def _write_val_predictions(path: Path, spec: DatasetSpec, probabilities: np.ndarray) -> None:
    """Each val image (relative to the dataset), its class, the predicted class and its probability:
    what the report's grid of confident mistakes is drawn from."""
    rows = [["path", "true", "predicted", "probability"]]
    for sample, p in zip(spec.splits["val"], probabilities):
        rows.append([spec.relative(sample.path), spec.classes[sample.label], spec.classes[int(p.argmax())], f"{p.max():.6f}"])
    atomic_write(path, lambda f: csv.writer(f).writerows(rows), newline="", encoding="utf-8")


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
        "strategy_reason": decision.explanation if decision else ASKED_FOR,
        **({"auto": _auto(assessment, decision)} if assessment else {}),
        **({"backbone_ranking": ranking} if ranking else {}),
        "head": model.trained.details,
        "backbone": {"name": backbone.name, "arch": backbone.arch, **backbone.weights.to_dict()},
        "splits": spec.counts(), "val_from": spec.val_from, "classes": spec.classes,
        "quarantined": len(spec.quarantined), "skipped": dict(spec.skipped), "data_notes": spec.notes,
        "metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
        "val_accuracy": metrics["accuracy"],
        "tuning": model.tuning, "timings": timings, "bundle": str(bundle.resolve()),
    }


def _log_run(run: FitRun, out: Path, model: FittedModel, metrics: dict, timings: dict, artifacts: list[str]) -> None:
    calibration = model.trained.details.get("calibration", {})
    run.log_metrics({"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
                     **{f"val_{k}": v for k, v in calibration.items() if k.startswith(("nll", "ece"))},
                     **({"temperature": calibration["temperature"]} if calibration else {}),
                     **{f"val_f1_{c}": m["f1"] for c, m in metrics["per_class"].items()},
                     **{f"seconds_{k}": v for k, v in timings.items()}},
                    step=len(model.trained.history))
    run.log_params({f"result_{k}": v for k, v in model.trained.details.items() if not isinstance(v, dict)})
    if model.decision is not None:
        run.log_params({"result_strategy": model.config.strategy, "result_layer": model.config.layer})
    for name in artifacts:
        run.log_artifact(out / name)


def _log_mlflow_model(run: FitRun, result: FitResult) -> None:
    """The bundle as the run's MLflow model (``runs:/<id>/model``). A failure leaves the fit whole,
    says so in one line, and takes the model out of the summary."""
    from tlpipe.serving import log_model

    try:  # the stored code's checksum kept here too: `tlpipe serve OUTPUT` trusts this copy, not the store's
        result.summary["mlflow_code_sha256"] = log_model(run, result.bundle_path)
    except Exception as exc:  # noqa: BLE001 - the bundle and summary are saved: the MLflow model is one more copy
        announce(f"[yellow]Note[/] the MLflow model was not logged ({type(exc).__name__}: {str(exc)[:200]}); "
                 f"the bundle {result.bundle_path} predicts as it is")
        result.summary.pop("mlflow_model", None)
    write_json(result.output_dir / SUMMARY, result.summary)
    run.log_artifact(result.output_dir / SUMMARY)


@contextmanager
def claim_output(out: Path, data: Path, config: FitConfig, overwrite: bool = False) -> Iterator[None]:
    """One writer per output folder: a lock held for the whole fit, and the folder's owner record.
    A fit of other data or another config refuses a folder another fit finished or left, unless
    ``overwrite`` (its files are then removed, the content-keyed caches kept); the same fit again
    resumes. Temporary files a killed fit left are swept."""
    output_folder(out, "--output", dataset=data)
    lock = FileLock(out / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        other = _owner(out)
        raise TlpipeError(f"{out} is in use by another tlpipe fit (pid {other.get('pid', '?')}, started "
                          f"{other.get('started', '?')}): wait for it to end, or give another --output") from None
    try:
        owner, key = _owner(out), fit_key(data, config)
        if owner.get("key", key) != key:
            if not overwrite:
                raise TlpipeError(f"{out} holds a fit of {owner.get('data')} with another config or other data: "
                                  "add --overwrite to replace it, or give another --output")
            _clear(out, data)
            owner = {}
        sweep_temporary(out)
        write_json(out / OWNER, {**owner, "key": key, "data": str(Path(data).resolve()), "pid": os.getpid(),
                                 "started": datetime.now().isoformat(timespec="seconds")})
        yield
    finally:
        lock.release()


def fit_key(data: Path, config: FitConfig) -> str:
    """What makes two fits the same fit: the data folder and the config, less what does not change the
    model (the time budget: a re-run with more time continues the fit; the device, the loader workers)."""
    what = {"data": str(Path(data).resolve()),
            "config": config.model_dump(mode="json", exclude={"budget", "device", "num_workers"})}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def recorded_run(out: Path, tracking_uri: str) -> str | None:
    """The MLflow run an earlier run of this fit logged to, in the same store (None: none)."""
    owner = _owner(out)
    return owner.get("run_id") if owner.get("tracking_uri") == tracking_uri else None


def keep_run(out: Path, run: FitRun) -> None:
    """Remember the fit's MLflow run, so a re-run after a kill continues it rather than opening another."""
    write_json(out / OWNER, {**_owner(out), "run_id": run.run_id, "tracking_uri": run.tracking_uri})


def sweep_temporary(out: Path) -> None:
    """Remove what a killed fit or export left half-written: temporary files, a staging bundle."""
    sweep_temporaries(out, recursive=True, skip=("cache",))
    shutil.rmtree(Path(out) / f".{BUNDLE}.staging", ignore_errors=True)


def _owner(out: Path) -> dict:
    try:
        owner = read_json(Path(out) / OWNER)
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


FIT_FILES = (BUNDLE, SUMMARY, STAGED_SUMMARY, OWNER, "plan.json", "config.yaml", "checkpoints", "trials", "tuning",
             "optuna.db", "classification_report.json", "confusion_matrix.png", "reliability.png", "learning_curves.png",
             "strategy.json", "quarantine.csv", VAL_PREDICTIONS, "report.html", "profile.json", f".{BUNDLE}.old",
             STAGED_REPORTS)


def _clear(out: Path, data: Path) -> None:
    """The files a fit writes in ``out``, and only those (the caches, keyed by content, stay; so does
    anything else, the dataset above all, wherever it sits)."""
    keep = Path(data).resolve()
    for name in FIT_FILES:
        path = Path(out) / name
        if keep.is_relative_to(path.resolve()):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
