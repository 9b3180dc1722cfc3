"""The Python API behind ``tlpipe fit`` and ``tlpipe extract``: each stage in order, timed.

``fit(data, config)`` checks and splits the data, builds the backbone, extracts CNN codes, fits
the strategy, saves the bundle, logs the MLflow run and writes ``summary.json``; it returns a
``FitResult``. Everything is written under the output folder, never into the dataset folder.
"""
from __future__ import annotations

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
from tlpipe.models import PENULTIMATE, Backbone, create_backbone
from tlpipe.metrics import classification_metrics, save_confusion_matrix, save_learning_curves
from tlpipe.training.strategies import dataset_codes, fit_finetune, fit_linear
from tlpipe.tracking import FitRun
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
) -> FitResult:
    """Fit ``config.strategy`` on ``data``; see the module docstring."""
    config = config or load_config(recipe)
    data = Path(data).expanduser()
    out = Path(output) if output else default_output_dir(data)
    timings = Timings()
    with timings.stage("check_data"):
        spec = prepare_dataset(data, config.val_fraction, config.seed, report_dir=out)
    atomic_write(out / "config.yaml", lambda f: f.write(config_to_yaml(config)))
    experiment = experiment or re.sub(r"[^\w.-]+", "_", data.resolve().name) or "tlpipe"
    layer = config.layer if config.strategy == "linear" else PENULTIMATE  # fine-tuning trains the full head path
    with FitRun(experiment, tracking_uri, run_name=out.name) as run:
        with timings.stage("load_backbone"):
            backbone = build_backbone(config)
        run.log_params(_params(config, recipe, backbone, spec))
        with timings.stage("extract_codes"):
            codes = {split: dataset_codes(backbone, spec, split, config, layer) for split in ("train", "val")}
        with timings.stage("train"):
            if config.strategy == "linear":
                trained = fit_linear(backbone, spec, config, codes)
            else:
                trained = fit_finetune(backbone, spec, config, out, codes, on_epoch=lambda e, m: run.log_metrics(m, step=e))
        if trained.backbone_trained:  # validation through the same path prediction takes
            with timings.stage("evaluate"):
                codes["val"] = dataset_codes(backbone, spec, "val", config, layer)
        X_val, y_val = codes["val"]
        metrics = classification_metrics(y_val, trained.head.predict(X_val), spec.classes)
        bundle_path = save_bundle(
            out / "model", backbone, trained.head, spec.classes, layer=str(layer), layer_relu=config.layer_relu,
            config=config.model_dump(mode="json"), metrics={"val_accuracy": metrics["accuracy"]},
            trained=trained.backbone_trained,
        )
        write_json(out / "classification_report.json", metrics)
        save_confusion_matrix(metrics["confusion_matrix"], spec.classes, out / "confusion_matrix.png")
        artifacts = ["confusion_matrix.png", "classification_report.json", "quarantine.csv", "config.yaml"]
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
            "strategy_reason": "asked for (--strategy or the recipe)",
            "head": trained.details,
            "backbone": {"name": backbone.name, "arch": backbone.arch, **backbone.weights.to_dict()},
            "splits": spec.counts(),
            "val_from": spec.val_from,
            "classes": spec.classes,
            "quarantined": len(spec.quarantined),
            "skipped": dict(spec.skipped),
            "metrics": {k: v for k, v in metrics.items() if k != "confusion_matrix"},
            "val_accuracy": metrics["accuracy"],
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
