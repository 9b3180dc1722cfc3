"""The Python API behind ``tlpipe fit`` and ``tlpipe extract``: each stage in order, timed.

``fit(data, config)`` checks and splits the data, builds the backbone, extracts CNN codes, fits
the strategy, saves the bundle, logs the MLflow run and writes ``summary.json``; it returns a
``FitResult``. Everything is written under the output folder, never into the dataset folder.
Under ``torchrun`` every rank runs ``fit``: all of them train, rank 0 alone writes and logs,
and the others return None.
"""
from __future__ import annotations

import dataclasses
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

from tlpipe import __version__
from tlpipe.bundle import save_bundle
from tlpipe.config import FitConfig, config_to_yaml, load_config
from tlpipe.data import DatasetSpec, prepare_dataset
from tlpipe.models import PENULTIMATE, Backbone, create_backbone, resolve_layer
from tlpipe.metrics import classification_metrics, save_confusion_matrix, save_learning_curves
from tlpipe.device import resolve_device
from tlpipe.progress import announce
from tlpipe.strategy.auto import Assessment, assess, rank_backbones
from tlpipe.strategy.decision import Decision, keep_finetune, standard_error
from tlpipe.strategy.signals import collect_splits
from tlpipe.training.distributed import init_distributed, shutdown
from tlpipe.tuning import Tuned, finetune_objective, join_study, linear_objective, run_study, study_summary, tune
from tlpipe.training.strategies import TrainedHead, dataset_codes, fit_finetune, fit_linear
from tlpipe.tracking import FitRun, NoRun
from tlpipe.utils import atomic_write, write_json

SUMMARY = "summary.json"


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


@dataclass
class FitResult:
    output_dir: Path
    bundle_path: Path
    run_id: str
    summary: dict
    spec: DatasetSpec
    metrics: dict


def default_output_dir(data: Path) -> Path:
    return Path("runs") / f"{data.resolve().name}-{datetime.now():%Y%m%d-%H%M%S}"


def build_backbone(config: FitConfig) -> Backbone:
    """The backbone the config names, with its data config at the recipe's image size."""
    backbone = create_backbone(config.backbone, weights=config.weights)
    if config.image_size:
        backbone.data_config["input_size"] = (3, config.image_size, config.image_size)
    return backbone


def fit(
    data: str | Path,
    config: FitConfig | None = None,
    *,
    output: str | Path | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    recipe: str = "default",
    tuning: TuningOverrides | None = None,
) -> FitResult | None:
    """Fit ``config.strategy`` on ``data``; see the module docstring. ``tuning`` overrides the
    recipe's study size and storage for this run (``--trials``, ``--storage``...)."""
    config = config or load_config(recipe)
    data = Path(data).expanduser()
    out = Path(output) if output else default_output_dir(data)
    context = init_distributed(resolve_device(config.device))
    if not context.is_main and config.strategy == "linear":
        shutdown()
        return None  # nothing to share out: rank 0 fits the linear head alone
    timings = Timings()
    with timings.stage("check_data"):
        spec = prepare_dataset(data, config.val_fraction, config.seed, report_dir=out if context.is_main else None)
    if context.is_main:
        atomic_write(out / "config.yaml", lambda f: f.write(config_to_yaml(config)))
    experiment = experiment or re.sub(r"[^\w.-]+", "_", data.resolve().name) or "tlpipe"
    with FitRun(experiment, tracking_uri, run_name=out.name) if context.is_main else NoRun() as run:
        with timings.stage("load_backbone"):
            backbone, ranking = choose_backbone(config, spec)
        assessment, probe = None, None
        if config.strategy == "auto":
            with timings.stage("extract_codes"), context.main_first():  # the pass the codes need, with hooks
                features = collect_splits(backbone, spec, config, cache=Path(config.cache_dir or out / "cache"))
            with timings.stage("decide"):
                assessment = assess(features, spec, config, tuning.trials if tuning else None)
                if assessment.decision.strategy == "linear" and context.is_main:  # the other ranks stop here
                    probe = _best_linear(assessment, config)[0].details  # the tap; its classifier and C are trial 0
            config = assessment.apply(config)
            if context.is_main:
                announce(_decision_line(assessment.decision, config))
            if not context.is_main and config.strategy == "linear":
                shutdown()
                return None
        layer = code_layer(config)
        run.log_params(_params(config, recipe, backbone, spec))
        if assessment:
            run.log_params(_auto_params(assessment, ranking))
            codes = {split: assessment.codes(split, layer) for split in ("train", "val")}
        else:
            with timings.stage("extract_codes"), context.main_first():
                codes = {split: dataset_codes(backbone, spec, split, config, layer, cache_dir=out / "cache")
                         for split in ("train", "val")}
        with timings.stage("tune"):
            defaults = _chosen_params(probe) if probe else None
            tuned = _tune(config, out, strategy_objective(config, backbone, spec, out, codes, defaults), run, context, tuning)
        config = tuned.config
        with timings.stage("train"):
            if config.strategy == "linear":
                trained = fit_linear(config, codes)
            else:  # in the best trial's folder: its finished checkpoint is resumed, not trained again
                trained = fit_finetune(backbone, spec, config, tuned.fit_dir or out, codes,
                                       on_epoch=lambda e, m: run.log_metrics(m, step=e), context=context)
        if context.enabled:  # training is over: rank 0 goes on alone
            context.barrier()
            shutdown()
            if not context.is_main:
                return None
        if trained.backbone_trained:  # validation through the same path prediction takes
            with timings.stage("evaluate"):
                codes["val"] = dataset_codes(backbone, spec, "val", config, layer)
            if assessment:
                with timings.stage("linear_baseline"):
                    linear, linear_codes, linear_config = _linear_baseline(assessment, config, out)
                if not _finetune_pays(trained, codes["val"], linear, linear_codes["val"], assessment):
                    backbone, codes, trained = build_backbone(config), linear_codes, linear  # the pretrained weights
                    layer, config = linear_config.layer, linear_config
        X_val, y_val = codes["val"]
        metrics = classification_metrics(y_val, trained.head.predict(X_val), spec.classes)
        bundle_path = save_bundle(
            out / "model", backbone, trained.head, spec.classes, layer=resolve_layer(backbone.model, layer), layer_relu=config.layer_relu,
            config=config.model_dump(mode="json"), metrics={"val_accuracy": metrics["accuracy"]},
            trained=trained.backbone_trained,
        )
        write_json(out / "classification_report.json", metrics)
        save_confusion_matrix(metrics["confusion_matrix"], spec.classes, out / "confusion_matrix.png")
        artifacts = ["confusion_matrix.png", "classification_report.json", "quarantine.csv", "config.yaml"]
        if assessment:
            write_json(out / "strategy.json", {**assessment.to_dict(), "backbone_ranking": ranking})
            artifacts.append("strategy.json")
        if trained.history:
            save_learning_curves(trained.history, out / "learning_curves.png")
            artifacts.append("learning_curves.png")
        summary = {
            "run_id": run.run_id,
            "tracking_uri": run.tracking_uri,
            "experiment": experiment,
            "tlpipe_version": __version__,
            "data": str(data.resolve()),
            "strategy": config.strategy,
            "strategy_reason": assessment.decision.explanation if assessment else "asked for (--strategy or the recipe)",
            **({"auto": assessment.to_dict()} if assessment else {}),
            **({"backbone_ranking": ranking} if ranking else {}),
            "head": trained.details,
            "backbone": {"name": backbone.name, "arch": backbone.arch, **backbone.weights.to_dict()},
            "splits": spec.counts(),
            "val_from": spec.val_from,
            "classes": spec.classes,
            "quarantined": len(spec.quarantined),
            "skipped": dict(spec.skipped),
            "metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
            "val_accuracy": metrics["accuracy"],
            "tuning": tuned.summary,
            "timings": timings.seconds,
            "bundle": str(bundle_path.resolve()),
        }
        run.log_metrics({"val_accuracy": metrics["accuracy"], "val_macro_f1": metrics["macro_f1"],
                         **{f"val_f1_{c}": m["f1"] for c, m in metrics["per_class"].items()},
                         **{f"seconds_{k}": v for k, v in timings.seconds.items()}},
                        step=len(trained.history))
        run.log_params({f"result_{k}": v for k, v in trained.details.items() if not isinstance(v, dict)})
        for name in artifacts:
            run.log_artifact(out / name)
        run.log_artifact(bundle_path, "model")
        write_json(out / SUMMARY, summary)
        run.log_artifact(out / SUMMARY)
    return FitResult(out, bundle_path, run.run_id, summary, spec, metrics)


def _params(config: FitConfig, recipe: str, backbone: Backbone, spec: DatasetSpec) -> dict:
    counts = spec.counts()
    return {
        "recipe": recipe, "strategy": config.strategy, "backbone": backbone.name, "arch": backbone.arch,
        "weights_source": backbone.weights.kind, "weights_location": backbone.weights.location,
        "weights_sha256": backbone.weights.sha256, "layer": config.layer, "layer_relu": config.layer_relu,
        "input_size": backbone.data_config["input_size"][-1], "seed": config.seed,
        "batch_size": config.batch_size, "n_classes": len(spec.classes), "val_from": spec.val_from,
        "quarantined": len(spec.quarantined), **{f"n_{split}": n for split, n in counts.items()},
        "linear_classifiers": ",".join(config.linear.classifiers), "linear_cv_folds": config.linear.cv_folds,
        **({f"finetune_{k}": v for k, v in config.finetune.model_dump().items()} if config.strategy != "linear" else {}),
    }


def code_layer(config: FitConfig) -> str | int:
    """The tap the strategy's codes come from: fine-tuning trains the full head path."""
    return config.layer if config.strategy == "linear" else PENULTIMATE


def strategy_objective(config: FitConfig, backbone: Backbone, spec: DatasetSpec, out: Path, codes: dict,
                       linear_defaults: dict | None = None):
    """The Optuna objective of the (resolved) strategy: linear trials on codes (trial 0
    ``linear_defaults`` when known), or fine-tunes."""
    if config.strategy == "linear":
        return linear_objective(codes, linear_defaults)
    return finetune_objective(backbone, spec, out, codes)


@dataclass
class TuningOverrides:
    """This run's Optuna settings over the recipe's: None keeps the recipe's value."""

    trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    study_name: str | None = None


def _tune(config, out, objective, run, context, overrides: TuningOverrides | None) -> Tuned:
    """The study over the strategy's hyperparameters (``tlpipe.tuning``); off under torchrun, where
    every rank would run its own study: tune first, then train the best config with DDP."""
    overrides = overrides or TuningOverrides()
    if context.enabled:
        return Tuned(config, summary={"trials": 0, "skipped": "under torchrun: tune in a single process or with workers"})
    return tune(config, out, objective, parent=run, **dataclasses.asdict(overrides))


def run_worker(data: str | Path, storage: str, study_name: str, output: str | Path) -> dict:
    """A tuning worker: joins the study a lead ``fit`` opened on a shared ``storage``, runs queued
    trials until none is left, and returns the study's counts. The lead alone fits the final model."""
    study, config = join_study(storage, study_name)
    out = Path(output)
    config = config.model_copy(update={"cache_dir": str(out.resolve() / "cache")})  # this machine's own cache
    spec = prepare_dataset(Path(data).expanduser(), config.val_fraction, config.seed, report_dir=None)
    backbone = build_backbone(config)
    layer = code_layer(config)
    codes = {split: dataset_codes(backbone, spec, split, config, layer) for split in ("train", "val")}
    run_study(study, strategy_objective(config, backbone, spec, out, codes), config, worker=True)
    return study_summary(study)


def choose_backbone(config: FitConfig, spec: DatasetSpec) -> tuple[Backbone, list[dict]]:
    """The recipe's backbone, or with ``candidates`` under auto the one the transfer signals rank
    best; returns it with the ranking (empty when there was nothing to rank)."""
    if config.strategy != "auto" or len(config.candidates) < 2:
        return build_backbone(config), []
    build = lambda name: build_backbone(config.model_copy(update={"backbone": name}))  # noqa: E731
    ranking = rank_backbones(config.candidates, spec, config, build)
    return build(ranking[0]["backbone"]), ranking


def _best_linear(assessment: Assessment, config: FitConfig) -> tuple[TrainedHead, dict, float]:
    """A linear classifier on each of the assessment's taps (its one pass holds their codes); the
    better on validation becomes the decision's tap, and is returned with its codes and val accuracy."""
    fits = {}
    for tap in assessment.linear_taps():
        codes = {split: assessment.codes(split, tap) for split in ("train", "val")}
        trained = fit_linear(config, codes)
        fits[tap] = (trained, codes, trained.details["candidates"][trained.details["chosen"]]["val_accuracy"])
    tap = max(fits, key=lambda t: fits[t][2])  # the last features first: they win a tie
    assessment.decision.layer = tap
    name = lambda t: "the last features" if t == PENULTIMATE else t  # noqa: E731
    assessment.decision.reasons.append(
        "Linear classifiers on validation: " + ", ".join(f"{name(t)} {fits[t][2]:.3f}" for t in fits)
        + f"; {name(tap)} kept.")
    return fits[tap]


def _chosen_params(details: dict) -> dict:
    """A fitted linear head's classifier and C as trial params: trial 0 of a linear study."""
    return {"classifier": details["chosen"], "C": details["candidates"][details["chosen"]]["C"]}


def _linear_baseline(assessment: Assessment, config: FitConfig, out: Path) -> tuple[TrainedHead, dict, FitConfig]:
    """The linear classifier a fine-tune must beat, and the fit's result if it does not: the best
    tap on validation, its classifier and C tuned as a linear fit tunes them (a study of its own in
    ``<out>/linear_baseline``), so falling back loses nothing against ``--strategy linear``."""
    probe, codes, _ = _best_linear(assessment, config)
    linear_config = config.model_copy(update={"strategy": "linear", "layer": assessment.decision.layer})
    tuned = tune(linear_config, out / "linear_baseline", linear_objective(codes, _chosen_params(probe.details)))
    return fit_linear(tuned.config, codes), codes, tuned.config


def _val_accuracy(trained: TrainedHead, val_codes: tuple) -> float:
    X_val, y_val = val_codes
    return float((trained.head.predict(X_val) == y_val).mean())


def _finetune_pays(trained: TrainedHead, val_codes: tuple, linear: TrainedHead, linear_val_codes: tuple,
                   assessment: Assessment) -> bool:
    """The auto guard: the fine-tune's val accuracy must beat the tuned linear classifier's by more
    than its standard error; the decision records the outcome either way."""
    finetune_accuracy, linear_accuracy = _val_accuracy(trained, val_codes), _val_accuracy(linear, linear_val_codes)
    y_val = val_codes[1]
    pays = keep_finetune(finetune_accuracy, linear_accuracy, len(y_val))
    assessment.decision.reasons.append(
        f"Guard: the fine-tune scored {finetune_accuracy:.3f} on validation against {linear_accuracy:.3f} for the "
        f"linear classifier (standard error {standard_error(linear_accuracy, len(y_val)):.3f}): "
        + ("the fine-tune is kept." if pays else "not clearly better, so the linear classifier stands."))
    return pays


def _decision_line(decision: Decision, config: FitConfig) -> str:
    """What auto chose, said before the study starts (the report at the end has the reasons)."""
    study = "" if decision.finetune_minutes is None else (
        f"; a fine-tuning study here: at most {decision.finetune_minutes:g} min (budget {config.auto.finetune_minutes:g})")
    return f"[bold]Strategy[/] {decision.headline}{study}"


def _auto_params(assessment: Assessment, ranking: list[dict]) -> dict:
    decision, signals = assessment.decision, assessment.signals
    return {
        "auto_strategy": decision.strategy, "auto_layer": decision.layer, "auto_size": decision.size,
        "auto_similarity": decision.similarity, "auto_domain_gap": round(signals.domain_gap, 4),
        "auto_probe_accuracy": round(signals.penultimate["probe_accuracy"], 4), "auto_best_stage": signals.best_stage,
        "auto_estimated_fit_seconds": assessment.estimate.get("fit_seconds"),
        "auto_finetune_study_minutes": decision.finetune_minutes,
        **({"backbone_ranking": ",".join(r["backbone"] for r in ranking)} if ranking else {}),
    }


def inspect(data: str | Path, config: FitConfig | None = None, *, recipe: str = "default") -> dict:
    """What ``tlpipe fit --strategy auto`` would see and do, without training or writing anything:
    the data profile (counts, sizes, greyscale, duplicates, leakage), the transfer signals, the
    decision with its reasons, and the fit's estimated time (and memory, for a fine-tune)."""
    from tlpipe.data.profile import profile_dataset
    from tlpipe.strategy.auto import estimate_training_memory

    config = config or load_config(recipe)
    spec = prepare_dataset(Path(data).expanduser(), config.val_fraction, config.seed, report_dir=None)
    profile = profile_dataset(spec)
    backbone, ranking = choose_backbone(config.model_copy(update={"strategy": "auto"}), spec)
    assessment = assess(collect_splits(backbone, spec, config), spec, config)  # the fit's pass: it decides alike
    if assessment.decision.strategy != "linear":
        assessment.estimate.update(estimate_training_memory(backbone, config))
    return {
        "data": str(spec.root), "classes": spec.classes, "splits": spec.counts(), "val_from": spec.val_from,
        "quarantined": [(spec.relative(path), why) for path, why in spec.quarantined],
        "profile": profile.to_dict(), "backbone": backbone.name, "backbone_ranking": ranking, **assessment.to_dict(),
    }


def extract(
    data: str | Path, out: str | Path, config: FitConfig | None = None, *, recipe: str = "default"
) -> Path:
    """Write the CNN codes of every valid image of ``data`` (all splits as found) to ``out``:
    ``.npz`` (see ``tlpipe.codes``) or ``.parquet``. Files that fail the check are left out and
    listed, with the reason, in the file's metadata."""
    from tlpipe.codes import save_codes

    config = config or load_config(recipe)
    out = Path(out)
    spec = prepare_dataset(data, seed=config.seed, hold_out=False, report_dir=None)
    backbone = build_backbone(config)
    parts = {split: dataset_codes(backbone, spec, split, config) for split in spec.splits}
    return save_codes(out, spec, parts, backbone, config)
