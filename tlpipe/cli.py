"""The ``tlpipe`` command: thin Typer functions over the Python API (``tlpipe.pipeline`` & co).

Every ``TlpipeError`` becomes one line on stderr and exit code 2; nothing here holds logic that
the API lacks.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
import typer.core

from tlpipe.config import StrategyName, available_recipes
from tlpipe.errors import TlpipeError
from tlpipe.examples import ExampleName

app = typer.Typer(
    help="Transfer-learning AutoML for image classification: from a folder of images to the best "
    "classifier a pretrained CNN can give, with every choice explained and recorded in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class UnixUsage(typer.core.TyperCommand):
    """Usage lines as Unix tools write them (``tlpipe predict [OPTIONS] BUNDLE PATHS...``): Typer
    0.29 writes a required argument as ``{bundle}``, which reads as a literal to type."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if isinstance(p, typer.core.TyperArgument)]
        shown = [(a.metavar or a.name.upper()) + ("..." if a.nargs != 1 else "") for a in arguments]
        shown = [name if a.required else f"[{name}]" for a, name in zip(arguments, shown)]
        return [self.options_metavar, *shown] if self.options_metavar else shown


@app.callback()
def _library_logs(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show Optuna's and MLflow's own log lines.")] = False,
) -> None:
    """tlpipe's report says what the study and the store did; their INFO lines (one per trial) would
    bury it. The API quiets them during a fit (``fit(verbose=...)``); the store's start-up lines are
    read from the environment when mlflow is imported."""
    ctx.obj = {"verbose": verbose}
    if verbose or ctx.invoked_subcommand == "ui":  # the UI server's own lines stay
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a ``TlpipeError``, or a path the file system refuses as too long, into one line on
    stderr and exit code 2."""
    from tlpipe.paths import too_long

    try:
        yield
    except TlpipeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        if (line := too_long(exc)) is None:
            raise
        typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from None


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


DEVICE_FORMS = "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N (GPU number N) or mps"
WEIGHTS_FORMS = "auto (the backbone's pretrained weights), none (random init) or the path of a .safetensors/.pt/.pth file"


def _device(value: Optional[str]) -> Optional[str]:
    """A device torch cannot name fails here, before any data is read, with the forms it takes."""
    if value is None or re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return value
    raise typer.BadParameter(f"'{value}' is not a device: use {DEVICE_FORMS}")


def _weights(value: Optional[str]) -> Optional[str]:
    """A typo in auto/none would otherwise be read as a file name and fail only after the data check."""
    if value is None or value in ("auto", "none") or Path(value).expanduser().is_file():
        return value
    raise typer.BadParameter(f"'{value}' is neither auto, none nor an existing file: use {WEIGHTS_FORMS}")


Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]
Bundle = Annotated[Path, typer.Argument(help="A model bundle: <output>/model from tlpipe fit.")]
Recipe = Annotated[str, typer.Option(
    "--recipe", "-r", help=f"Recipe: {', '.join(available_recipes())}, or the path of a YAML file (see recipes/).")]
Backbone = Annotated[Optional[str], typer.Option(help="Backbone: `tlpipe models` lists offline ones; any timm name.")]
Weights = Annotated[Optional[str], typer.Option(callback=_weights, help=f"Backbone weights: {WEIGHTS_FORMS}.")]
Layer = Annotated[Optional[str], typer.Option(help="CNN-code tap: penultimate, a feature index (0, -2) or module name; several joined by + are concatenated.")]
ImageSize = Annotated[Optional[int], typer.Option(help="Input resolution (default: the backbone's).")]
BatchSize = Annotated[Optional[int], typer.Option(help="Images per batch.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes.")]
Device = Annotated[Optional[str], typer.Option(callback=_device, help=f"Device: {DEVICE_FORMS}.")]
TimeLimit = Annotated[Optional[str], typer.Option(
    help="Time for the whole fit: 90s, 10m, 1.5h, 2h15m, or none (default: the recipe's budget, 30m for default).")]


@app.command(cls=UnixUsage)
def fit(
    ctx: typer.Context,
    data: Annotated[Optional[Path], typer.Argument(help="Folder with one subfolder per class (optionally under train/ val/ test/).")] = None,
    example: Annotated[Optional[ExampleName], typer.Option(help="Fit an embedded example dataset instead of DATA.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default runs/<data>-<time>).")] = None,
    recipe: Recipe = "default",
    strategy: Annotated[Optional[StrategyName], typer.Option(
        help="auto (chosen from the data's size and distance from ImageNet), linear (CNN codes + linear "
        "classifier), partial or full fine-tune (default: the recipe's).")] = None,
    unfreeze_stages: Annotated[Optional[int], typer.Option(help="Partial fine-tune: how many last stages train.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Fine-tuning epochs (at most; early stopping may end sooner).")] = None,
    backbone: Backbone = None,
    weights: Weights = None,
    layer: Layer = None,
    image_size: ImageSize = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share of train held out when there is no val/ folder.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split and the classifiers.")] = None,
    device: Device = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the dataset folder's name).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: MLFLOW_TRACKING_URI, else MLflow's default).")] = None,
    trials: Annotated[Optional[int], typer.Option(min=0, help="Optuna trials (default from the recipe; 0: no tuning).")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Seconds for the whole study (trials not started wait for a re-run).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage URL shared by workers, e.g. postgresql://... (default: SQLite in the output folder).")] = None,
    study_name: Annotated[Optional[str], typer.Option(help="Study name on --storage (default: derived from the config).")] = None,
    worker: Annotated[bool, typer.Option("--worker", help="Only run trials of the study a lead fit opened on --storage/--study-name.")] = False,
    time_limit: TimeLimit = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the fit of other data or another config in --output.")] = False,
    register: Annotated[Optional[str], typer.Option(help="Register the fit's MLflow model under this name (a new version).")] = None,
    alias: Annotated[str, typer.Option(help="With --register: the alias pointed at the new version (models:/NAME@ALIAS).")] = "champion",
) -> None:
    """Check the data, pick a strategy, tune, fit, save the bundle and log the run, within --time-limit."""
    with user_errors():
        from tlpipe.config import config_from_flags
        from tlpipe.budget import FitCut
        from tlpipe.pipeline import TuningOverrides, fit as run_fit
        from tlpipe.run.report import print_fit_report

        if (data is None) == (example is None):
            raise TlpipeError("give a dataset folder (tlpipe fit ./data) or --example digits, not both or neither")
        if worker:
            return _worker(data, storage, study_name, output)
        config = config_from_flags(
            recipe, strategy=strategy, backbone=backbone, weights=weights, layer=layer, image_size=image_size,
            batch_size=batch_size, workers=workers, val_fraction=val_fraction, seed=seed, device=device,
            unfreeze_stages=unfreeze_stages, epochs=epochs, time_limit=time_limit)
        if example is not None:
            from tlpipe.examples import write_example
            from tlpipe.pipeline import default_output_dir

            output = output or default_output_dir(Path(f"example-{example}"))
            data = write_example(example, output)
        try:
            result = run_fit(data, config, output=output, experiment=experiment, tracking_uri=tracking_uri, recipe=recipe,
                             tuning=TuningOverrides(trials, timeout, storage, study_name),
                             verbose=(ctx.obj or {}).get("verbose", False), overwrite=overwrite,
                             register=register, alias=alias)
        except FitCut as cut:
            _exit_cut(cut)
        if result is None:  # a torchrun rank other than 0: rank 0 reports
            return
        quarantined = [(result.spec.relative(p), why) for p, why in result.spec.quarantined]
        print_fit_report(result.summary, result.metrics, quarantined)
        if "error" in result.summary.get("registered", {}):  # the fit is saved; the registry refused it
            raise TlpipeError(result.summary["registered"]["error"])


def _exit_cut(cut) -> None:
    """A fit stopped by SIGTERM or Ctrl+C: one line on what it left and how to go on, and the signal's exit code."""
    saved = f"the best model so far is in {cut.result.bundle_path}" if cut.result else "no model was saved yet"
    typer.echo(f"tlpipe: fit {cut.reason}: {saved}; to continue, run the same command with "
               f"--output {shlex.quote(str(cut.output))}", err=True)
    raise typer.Exit(cut.exit_code) from None


def _worker(data: Optional[Path], storage: Optional[str], study_name: Optional[str], output: Optional[Path]) -> None:
    """``fit --worker``: trials only, on the lead's study; the lead alone fits the final model."""
    if data is None:  # --example: the worker cannot know which folder the lead wrote the example to
        raise TlpipeError("--worker needs the dataset folder the lead fit used (for --example digits: "
                          "<lead output>/example-digits): tlpipe fit DATA --worker --storage ... --study-name ...")
    if not (storage and study_name and output):
        raise TlpipeError("--worker needs --storage, --study-name and --output (where its trials write)")
    from tlpipe.pipeline import run_worker

    counts = run_worker(data, storage, study_name, output)
    typer.echo(f"worker done: study {study_name} has {counts['trials']} trials "
               f"({counts['complete']} complete, {counts['pruned']} pruned)")


@app.command(cls=UnixUsage)
def inspect(
    data: Annotated[Path, typer.Argument(help="Dataset folder (as for fit).")],
    recipe: Recipe = "default",
    backbone: Backbone = None,
    weights: Weights = None,
    image_size: ImageSize = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write everything to this JSON file.")] = None,
    time_limit: TimeLimit = None,
    overwrite: Overwrite = False,
) -> None:
    """Profile the data and say which strategy fit would choose, and why, and its plan within
    --time-limit, without training."""
    with user_errors():
        from tlpipe.config import config_from_flags
        from tlpipe.paths import output_file
        from tlpipe.pipeline import inspect as run_inspect
        from tlpipe.run.report import print_inspect_report
        from tlpipe.utils import write_json

        json_out = json_out and output_file(json_out, "--json", suffixes=[".json"], overwrite=overwrite, dataset=data)
        config = config_from_flags(recipe, backbone=backbone, weights=weights, image_size=image_size,
                                   batch_size=batch_size, workers=workers, device=device, time_limit=time_limit)
        result = run_inspect(data, config, recipe=recipe)
        print_inspect_report(result)
        if json_out:
            write_json(json_out, result)


@app.command(cls=UnixUsage)
def extract(
    data: Annotated[Path, typer.Argument(help="Dataset folder (as for fit).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .npz or .parquet.")] = Path("codes.npz"),
    recipe: Recipe = "default",
    backbone: Backbone = None,
    weights: Weights = None,
    layer: Layer = None,
    no_relu: Annotated[bool, typer.Option("--no-relu", help="Do not ReLU earlier-layer taps before pooling.")] = False,
    image_size: ImageSize = None,
    batch_size: BatchSize = None,
    workers: Workers = None,
    device: Device = None,
    overwrite: Overwrite = False,
) -> None:
    """Write CNN codes (pooled, ReLU'd pretrained features) of every image for a downstream classifier."""
    with user_errors():
        from tlpipe.config import config_from_flags
        from tlpipe.pipeline import extract as run_extract

        config = config_from_flags(recipe, backbone=backbone, weights=weights, layer=layer,
                                   layer_relu=False if no_relu else None, image_size=image_size,
                                   batch_size=batch_size, workers=workers, device=device)
        path = run_extract(data, out, config, recipe=recipe, overwrite=overwrite)
        typer.echo(f"wrote {path}")


@app.command(cls=UnixUsage)
def predict(
    bundle: Bundle,
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to show per image.")] = 1,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table, csv or json.")] = OutputFormat.table,
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
) -> None:
    """Predict the class of images with a saved bundle: top-k labels with probabilities."""
    with user_errors():
        from tlpipe.bundle.folder import expand_image_paths, load_bundle
        from tlpipe.run.report import print_predictions

        model = load_bundle(bundle, device)
        images, problems = expand_image_paths(paths)
        for path, why in problems:
            typer.echo(f"skipped {path}: {why}", err=True)
        if not images:
            raise TlpipeError("no readable image among the paths given")
        top_k = min(top_k, len(model.classes))
        print_predictions(model.predict(images, top_k, batch_size or 64, workers), format.value)


@app.command(cls=UnixUsage)
def evaluate(
    bundle: Bundle,
    data: Annotated[Path, typer.Argument(help="Dataset folder with class subfolders (or train/ val/ test/ above them).")],
    split: Annotated[Optional[str], typer.Option(help="Split to score: test, val or train (default: test/, else val/, else train/; a flat folder is scored whole).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON (for scripts) instead of tables.")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json-file", help="Also write the metrics to this JSON file.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write reliability.png and confusion_matrix.png (normalized) here.")] = None,
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Score a saved bundle on labelled images: accuracy with its interval, balanced accuracy, macro-F1,
    top-k, NLL, Brier, calibration error, per-class precision/recall/F1, confusion matrix."""
    with user_errors():
        from tlpipe.bundle.folder import load_bundle
        from tlpipe.bundle.evaluation import EVALUATION_PLOTS, evaluate_bundle
        from tlpipe.paths import output_file, output_folder
        from tlpipe.run.report import print_evaluation
        from tlpipe.utils import write_json

        json_file = json_file and output_file(json_file, "--json-file", suffixes=[".json"], overwrite=overwrite, dataset=data)
        plots = plots and output_folder(plots, "--plots", EVALUATION_PLOTS, overwrite=overwrite, dataset=data)
        metrics = evaluate_bundle(load_bundle(bundle, device), data, split, batch_size or 64, workers, plots)
        if json_file:
            write_json(json_file, metrics)
        if as_json:
            typer.echo(json.dumps(metrics, indent=2, ensure_ascii=False))
        else:
            print_evaluation(metrics)


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


class PixelType(str, Enum):
    uint8 = "uint8"
    float32 = "float32"


@app.command(cls=UnixUsage)
def export(
    bundle: Bundle,
    format: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (ONNX Runtime, opset 18) or torchscript.")] = ExportFormat.onnx,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="File to write (default: <output>/export/model.onnx or .pt).")] = None,
    input_type: Annotated[PixelType, typer.Option("--input", help="The graph's input: uint8 pixels 0..255 or float32 0..1, NCHW.")] = PixelType.uint8,
    check: Annotated[Optional[Path], typer.Option(help="Images to prove agreement on (default: up to 256 of the fit's validation images).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write the file even when it disagrees with the bundle.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file (the default file is always replaced).")] = False,
) -> None:
    """Export a bundle as one graph from pixels to calibrated probabilities, written only once it
    agrees with the bundle (top-1 on every image, probabilities within 1e-4 at batch 1, 2 and 7)."""
    with user_errors():
        from tlpipe.bundle.folder import load_bundle
        from tlpipe.bundle.export import export_bundle
        from tlpipe.run.report import print_export

        print_export(export_bundle(load_bundle(bundle, "cpu"), format.value, out, input_type=input_type.value,
                                   check=check, force=force, overwrite=overwrite))


@app.command(cls=UnixUsage)
def report(
    output: Annotated[Path, typer.Argument(help="The output folder of a finished tlpipe fit.")],
) -> None:
    """Rebuild <output>/report.html (one self-contained page: data, strategy, trials, metrics, mistakes)."""
    with user_errors():
        from tlpipe.run.html_report import write_html_report

        typer.echo(str(write_html_report(output)))


@app.command(cls=UnixUsage)
def models() -> None:
    """List the backbones usable offline right now, and where their weights come from."""
    with user_errors():
        from rich.console import Console
        from rich.table import Table

        from tlpipe.models import DEFAULT_BACKBONE, offline_backbones

        table = Table(title=f"Backbones with reachable weights (default: {DEFAULT_BACKBONE})")
        for column in ("name", "timm architecture", "weights from"):
            table.add_column(column)
        for row in offline_backbones():
            table.add_row(row["name"], row["arch"], row["source"])
        Console().print(table)


@app.command(cls=UnixUsage)
def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it private to this machine.")] = "127.0.0.1",
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: the one tlpipe fit uses).")] = None,
) -> None:
    """Serve the MLflow UI on the run history, bound to 127.0.0.1 unless told otherwise."""
    with user_errors():
        from tlpipe.run.servers import check_port_free, exposure_warning, runs_page, serve_ui
        from tlpipe.run.store import check_store

        tracking_uri = check_store(tracking_uri)
        check_port_free(host, port)
        if warning := exposure_warning(host, "the MLflow UI", "read, change and delete every run in the store"):
            typer.echo(warning, err=True)
        typer.echo(f"MLflow UI on {runs_page(tracking_uri, host, port)} for {tracking_uri} "
                   "(Ctrl+C stops it)")
        raise typer.Exit(serve_ui(tracking_uri, host, port))


@app.command(cls=UnixUsage)
def serve(
    target: Annotated[str, typer.Argument(help="A fit's output folder, or an MLflow model URI (runs:/<id>/model, models:/NAME@champion).")],
    port: Annotated[int, typer.Option(help="Port for the REST endpoint.")] = 5001,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it private to this machine.")] = "127.0.0.1",
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: the fit's, else the one tlpipe fit uses).")] = None,
    max_rows: Annotated[Optional[int], typer.Option(min=1, help="Most images in one request; more is answered 400 (default: TLPIPE_SERVE_MAX_ROWS, else 256).")] = None,
) -> None:
    """Serve a fit's MLflow model over HTTP (mlflow models serve: POST /invocations with base64 images),
    once the model and the tlpipe code stored with it (which the server runs) are checked."""
    with user_errors():
        from tlpipe.bundle.serving import MAX_ROWS_ENV, check_served_model, row_cap, serve_command, served_model
        from tlpipe.run.servers import check_port_free, exposure_warning, run_server

        served = served_model(target, tracking_uri)
        check_served_model(served)
        check_port_free(host, port)
        if warning := exposure_warning(host, "mlflow models serve", "query the model"):
            typer.echo(warning, err=True)
        typer.echo(f"Serving {served.uri} ({served.store}) on http://{host}:{port}/invocations (Ctrl+C stops it)")
        env = {"MLFLOW_TRACKING_URI": served.store, MAX_ROWS_ENV: str(max_rows or row_cap())}
        raise typer.Exit(run_server(serve_command(served.uri, host, port), "mlflow models serve", env))


def main() -> None:
    app(prog_name="tlpipe")


if __name__ == "__main__":
    sys.exit(main())
