"""What is done with a saved bundle: ``tlpipe predict``, ``evaluate``, ``export`` and ``suggest`` (what to label next)."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from tlpipe.cli.common import (
    BatchSize, Bundle, Device, LabelColumn, Overwrite, PathColumn, SplitColumn, TableTask, TableRoot, UnixUsage, Workers, user_errors,
)
from tlpipe.errors import TlpipeError

app = typer.Typer()


def checked_bundle(path: Path) -> None:
    """``path`` names a bundle with a valid bundle.json, checked without torch; else one line."""
    from tlpipe.bundle.manifest import bundle_manifest

    bundle_manifest(path)


def _fit_data(bundle: Path):
    """The dataset the bundle's fit trained on, when the fit folder around it names one still there:
    a command's output never goes inside it (the next fit would take a new folder for a class)."""
    from tlpipe.bundle.manifest import bundle_manifest
    from tlpipe.data.source import recorded_source
    from tlpipe.run.folder import RunFolder

    fit = RunFolder.saved(bundle_manifest(bundle)[0])
    return fit and recorded_source(fit.summary)


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command(cls=UnixUsage)
def predict(
    bundle: Bundle,
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders (searched recursively).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many classes to show per image.")] = 1,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table, csv or json.")] = OutputFormat.table,
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    explain: Annotated[Optional[Path], typer.Option("--explain", help="Also write each image with a heatmap of what "
                                                     "made the model predict its class (Grad-CAM) into this folder.")] = None,
    overwrite: Overwrite = False,
    no_reject: Annotated[bool, typer.Option("--no-reject", help="Answer a class for every image, even one far from "
                                                                  "every class the model knows (default: flagged unknown).")] = False,
) -> None:
    """Predict the class of images with a saved bundle: top-k labels with probabilities; an image of no
    class the model knows is flagged unknown."""
    with user_errors():
        checked_bundle(bundle)  # a wrong path is told before the heavy imports
        from tlpipe.bundle.folder import load_bundle
        from tlpipe.data.scan import expand_image_paths
        from tlpipe.paths import output_folder
        from tlpipe.run.bundle_report import print_predictions

        model = load_bundle(bundle, device)
        images, problems = expand_image_paths(paths)
        for path, why in problems:
            typer.echo(f"skipped {path}: {why}", err=True)
        if not images:
            raise TlpipeError("no readable image among the paths given")
        top_k = min(top_k, len(model.classes))
        if explain:  # checked before any work: never inside the images given, nothing replaced unasked
            from tlpipe.insight.heatmaps import overlay_names

            if any(explain.resolve() == p.resolve().parent for p in paths if p.is_file()):  # not among the images given
                raise TlpipeError(f"--explain {explain} holds images given to predict: give another folder")
            output_folder(explain, "--explain", overlay_names(images), overwrite=overwrite,
                          dataset=[p for p in paths if p.is_dir()] + [_fit_data(bundle)])
        print_predictions(model.predict(images, top_k, batch_size or 64, workers, reject=not no_reject), format.value)
        if explain:
            from tlpipe.insight.heatmaps import write_overlays

            written = write_overlays(model, images, explain)
            typer.echo(f"wrote {len(written)} heatmap(s) to {explain}", err=True)


@app.command(cls=UnixUsage)
def evaluate(
    bundle: Bundle,
    data: Annotated[str, typer.Argument(help="Dataset folder with class subfolders (or train/ val/ test/ above them), a table of image paths and labels, or a URL of either (s3://, gs://...).")],
    root: TableRoot = None,
    path_col: PathColumn = None,
    label_col: LabelColumn = None,
    split_col: SplitColumn = None,
    task: TableTask = None,
    split: Annotated[Optional[str], typer.Option(help="Split to score: test, val or train (default: test/, else val/, else train/; a flat folder is scored whole).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON (for scripts) instead of tables.")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json-file", help="Also write the metrics to this JSON file.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write reliability.png and confusion_matrix.png (normalized) here; pr_curves.png for a multi-label model.")] = None,
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
) -> None:
    """Score a saved bundle on labelled images: accuracy with its interval, balanced accuracy, macro-F1,
    top-k, NLL, Brier, calibration error, per-class precision/recall/F1, confusion matrix."""
    with user_errors():
        checked_bundle(bundle)  # a wrong path is told before the heavy imports
        from tlpipe.bundle.folder import load_bundle
        from tlpipe.bundle.evaluation import EVALUATION_PLOTS, evaluate_bundle
        from tlpipe.data.source import with_table_options
        from tlpipe.paths import output_file, output_folder
        from tlpipe.run.bundle_report import print_evaluation
        from tlpipe.utils import write_json

        data = with_table_options(data, root, path_col, label_col, split_col, task and task.value)
        json_file = json_file and output_file(json_file, "--json-file", suffixes=[".json"], overwrite=overwrite, dataset=data)
        plots = plots and output_folder(plots, "--plots", EVALUATION_PLOTS, overwrite=overwrite, dataset=data)
        metrics = evaluate_bundle(load_bundle(bundle, device), data, split, batch_size or 64, workers, plots)
        if json_file:
            write_json(json_file, metrics)
        if as_json:
            typer.echo(json.dumps(metrics, indent=2, ensure_ascii=False))
            for warning in metrics["warnings"]:  # the JSON holds them too; a script's log shows them
                typer.echo(f"warning: {warning}", err=True)
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
        checked_bundle(bundle)  # a wrong path is told before the heavy imports
        from tlpipe.bundle.folder import load_bundle
        from tlpipe.bundle.export import export_bundle
        from tlpipe.run.bundle_report import print_export

        print_export(export_bundle(load_bundle(bundle, "cpu"), format.value, out, input_type=input_type.value,
                                   check=check, force=force, overwrite=overwrite))




@app.command(cls=UnixUsage)
def suggest(
    bundle: Bundle,
    unlabelled: Annotated[Path, typer.Argument(help="Folder of images without labels (searched recursively).")],
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="How many images to suggest.")] = 100,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for suggestions.csv, label_studio.json and contact_sheet.png.")] = Path("suggestions"),
    batch_size: BatchSize = 64,
    workers: Workers = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
) -> None:
    """The unlabelled images to label next: uncertain ones, unlike each other (the most uncertain
    clustered, the image nearest each centre, at most 1,000 groups), most uncertain first; near-copies
    of the fit's labelled images skipped."""
    with user_errors():
        checked_bundle(bundle)  # a wrong path is told before the heavy imports
        from tlpipe.bundle.folder import load_bundle
        from tlpipe.data.scan import expand_image_paths
        from tlpipe.insight.labelling import OUTPUTS, suggest_to_label
        from tlpipe.paths import output_folder

        if not unlabelled.is_dir():
            raise TlpipeError(f"{unlabelled} is not a folder: give the folder of unlabelled images")
        images, problems = expand_image_paths([unlabelled])
        if not images:
            found = f"{len(problems)} image files, none of which opens" if problems[0][0] != unlabelled else "no image files"
            raise TlpipeError(f"{unlabelled} holds {found}: give the folder of unlabelled images")
        out = output_folder(out, "--out", OUTPUTS, overwrite=overwrite, dataset=[unlabelled, _fit_data(bundle)])
        for path, why in problems:
            typer.echo(f"skipped {path}: {why}", err=True)
        done = suggest_to_label(load_bundle(bundle, device), images, n, out, batch_size or 64, workers)
        skipped = f"; {done.duplicates} skipped as near-copies of the fit's labelled images" if done.duplicates else ""
        unknown = "" if done.labelled_known else " (the fit's images were not found: near-copies of them not checked)"
        typer.echo(f"suggested {done.picked} of {done.considered} images{skipped}{unknown}: {out}/suggestions.csv, "
                   "label_studio.json, contact_sheet.png")
