"""Looking at data without fitting: ``tlpipe inspect`` (what fit would choose, and why),
``tlpipe extract`` (CNN codes to a file) and ``tlpipe models`` (the backbones usable offline)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tlpipe.cli.common import (
    BatchSize, Backbone, Device, ImageSize, LabelColumn, Layer, Overwrite, PathColumn, Recipe, SplitColumn, TableTask, TableRoot,
    TimeLimit, UnixUsage, Weights, Workers, user_errors,
)

app = typer.Typer()


@app.command(cls=UnixUsage)
def inspect(
    data: Annotated[str, typer.Argument(help="Dataset folder, table or URL (as for fit).")],
    root: TableRoot = None,
    path_col: PathColumn = None,
    label_col: LabelColumn = None,
    split_col: SplitColumn = None,
    task: TableTask = None,
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
        from tlpipe.data.source import with_table_options
        from tlpipe.paths import output_file
        from tlpipe.explore import inspect as run_inspect
        from tlpipe.run.report import print_inspect_report
        from tlpipe.utils import write_json

        data = with_table_options(data, root, path_col, label_col, split_col, task and task.value)
        json_out = json_out and output_file(json_out, "--json", suffixes=[".json"], overwrite=overwrite, dataset=data)
        config = config_from_flags(recipe, backbone=backbone, weights=weights, image_size=image_size,
                                   batch_size=batch_size, workers=workers, device=device, time_limit=time_limit)
        result = run_inspect(data, config, recipe=recipe)
        print_inspect_report(result)
        if json_out:
            write_json(json_out, result)


@app.command(cls=UnixUsage)
def extract(
    data: Annotated[str, typer.Argument(help="Dataset folder, table or URL (as for fit).")],
    root: TableRoot = None,
    path_col: PathColumn = None,
    label_col: LabelColumn = None,
    split_col: SplitColumn = None,
    task: TableTask = None,
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
        from tlpipe.data.source import with_table_options
        from tlpipe.explore import extract as run_extract

        config = config_from_flags(recipe, backbone=backbone, weights=weights, layer=layer,
                                   layer_relu=False if no_relu else None, image_size=image_size,
                                   batch_size=batch_size, workers=workers, device=device)
        path = run_extract(with_table_options(data, root, path_col, label_col, split_col, task and task.value), out, config, recipe=recipe,
                           overwrite=overwrite)
        typer.echo(f"wrote {path}")


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


