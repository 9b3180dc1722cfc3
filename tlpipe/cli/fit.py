"""``tlpipe fit``: the Python API's ``fit`` (``tlpipe.pipeline``) with a flag for each setting a
user changes most, the rest in a recipe; ``--worker`` runs trials only, for a lead fit's study."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlpipe.cli.common import (
    BatchSize, Backbone, Device, ImageSize, LabelColumn, Layer, PathColumn, Recipe, SplitColumn, TableTask, TableRoot, TimeLimit,
    UnixUsage, Weights, Workers, user_errors,
)
from tlpipe.config import StrategyName
from tlpipe.errors import TlpipeError
from tlpipe.examples import ExampleName

app = typer.Typer()


# fit's own options, named here so that the command reads as its parameters' names
Data = Annotated[Optional[str], typer.Argument(help=(
    "Folder with one subfolder per class (optionally under train/ val/ test/), a table of image paths and labels "
    "(.csv, .tsv, .parquet), or a URL of either (s3://, gs://... through fsspec)."))]
Example = Annotated[Optional[ExampleName], typer.Option(help="Fit an embedded example dataset instead of DATA.")]
Output = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default runs/<data>-<time>).")]
Strategy = Annotated[Optional[StrategyName], typer.Option(
    help="auto (chosen from the data's size and distance from ImageNet), linear (CNN codes + linear "
    "classifier), partial or full fine-tune (default: the recipe's).")]
UnfreezeStages = Annotated[Optional[int], typer.Option(help="Partial fine-tune: how many last stages train.")]
Epochs = Annotated[Optional[int], typer.Option(help="Fine-tuning epochs (at most; early stopping may end sooner).")]
ValFraction = Annotated[Optional[float], typer.Option(help="Share of train held out when there is no val/ folder.")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for the split and the classifiers.")]
Experiment = Annotated[Optional[str], typer.Option(help="MLflow experiment (default: the dataset folder's name).")]
TrackingUri = Annotated[Optional[str], typer.Option(
    help="MLflow store (default: MLFLOW_TRACKING_URI, else MLflow's default).")]
Trials = Annotated[Optional[int], typer.Option(min=0, help="Optuna trials (default from the recipe; 0: no tuning).")]
StudyTimeout = Annotated[Optional[float], typer.Option(
    help="Seconds for the whole study (trials not started wait for a re-run).")]
Storage = Annotated[Optional[str], typer.Option(
    help="Optuna storage URL shared by workers, e.g. postgresql://... (default: SQLite in the output folder).")]
StudyName = Annotated[Optional[str], typer.Option(help="Study name on --storage (default: derived from the config).")]
WorkerOnly = Annotated[bool, typer.Option(
    "--worker", help="Only run trials of the study a lead fit opened on --storage/--study-name.")]
ExcludeLabelIssues = Annotated[bool, typer.Option(
    "--exclude-label-issues", help="Leave the train images whose label the pretrained codes contradict out of "
    "training (a fine-tune's label_issues.csv lists those of the network it became); the dataset is not touched.")]
OverwriteFit = Annotated[bool, typer.Option(
    "--overwrite", help="Replace the fit of other data or another config in --output.")]
Register = Annotated[Optional[str], typer.Option(
    help="Register the fit's MLflow model under this name (a new version).")]
Alias = Annotated[str, typer.Option(help="With --register: the alias pointed at the new version (models:/NAME@ALIAS).")]


@app.command(cls=UnixUsage)
def fit(
    ctx: typer.Context, data: Data = None, example: Example = None, output: Output = None,
    root: TableRoot = None, path_col: PathColumn = None, label_col: LabelColumn = None, split_col: SplitColumn = None,
    task: TableTask = None, recipe: Recipe = "default", strategy: Strategy = None,
    unfreeze_stages: UnfreezeStages = None, epochs: Epochs = None, backbone: Backbone = None, weights: Weights = None,
    layer: Layer = None, image_size: ImageSize = None, batch_size: BatchSize = None, workers: Workers = None,
    val_fraction: ValFraction = None, seed: Seed = None, device: Device = None, experiment: Experiment = None,
    tracking_uri: TrackingUri = None, trials: Trials = None, timeout: StudyTimeout = None, storage: Storage = None,
    study_name: StudyName = None, worker: WorkerOnly = False, time_limit: TimeLimit = None,
    exclude_label_issues: ExcludeLabelIssues = False, overwrite: OverwriteFit = False, register: Register = None,
    alias: Alias = "champion",
) -> None:
    """Check the data, pick a strategy, tune, fit, save the bundle and log the run, within --time-limit."""
    with user_errors():
        from tlpipe.config import config_from_flags
        from tlpipe.data.source import check_source, with_table_options

        data = with_table_options(data, root, path_col, label_col, split_col, task and task.value)
        if worker:
            return _worker(data, example, storage, study_name, output)
        if register:  # the registry's refusal comes first, as the API says it (its check loads MLflow)
            from tlpipe.stages.record import check_registry_names

            check_registry_names(register, alias)
        check_source(data)  # a mistyped folder is told before the heavy imports below
        from tlpipe.progress import announce

        announce(f"tlpipe fit {f'--example {example}' if example else data}: loading PyTorch, timm and the "
                 "backbone, then checking every image")
        from tlpipe.budget import FitCut
        from tlpipe.pipeline import TuningOverrides, fit as run_fit

        config = config_from_flags(
            recipe, strategy=strategy, backbone=backbone, weights=weights, layer=layer, image_size=image_size,
            batch_size=batch_size, workers=workers, val_fraction=val_fraction, seed=seed, device=device,
            unfreeze_stages=unfreeze_stages, epochs=epochs, time_limit=time_limit,
            exclude_label_issues=exclude_label_issues or None)
        try:
            result = run_fit(data, config, example=example, output=output, experiment=experiment,
                             tracking_uri=tracking_uri, recipe=recipe,
                             tuning=TuningOverrides(trials, timeout, storage, study_name),
                             verbose=(ctx.obj or {}).get("verbose", False), overwrite=overwrite, register=register, alias=alias)
        except FitCut as cut:
            _exit_cut(cut)
        if result is not None:  # None: a torchrun rank other than 0, rank 0 reports
            _report(result)


def _report(result) -> None:
    """The fit's report on the terminal; a registry that refused the model, as the one error line."""
    from tlpipe.run.report import print_fit_report

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


def _worker(data, example: Optional[str], storage: Optional[str], study_name: Optional[str],
            output: Optional[Path]) -> None:
    """``fit --worker``: trials only, on the lead's study; the lead alone fits the final model."""
    if data is None or example is not None:  # --example: the worker cannot know which folder the lead wrote the example to
        raise TlpipeError("--worker needs the dataset folder the lead fit used (for --example digits: "
                          "<lead output>/example-digits): tlpipe fit DATA --worker --storage ... --study-name ...")
    if not (storage and study_name and output):
        raise TlpipeError("--worker needs --storage, --study-name and --output (where its trials write)")
    from tlpipe.stages.train import run_worker

    counts = run_worker(data, storage, study_name, output)
    typer.echo(f"worker done: study {study_name} has {counts['trials']} trials "
               f"({counts['complete']} complete, {counts['pruned']} pruned)")


