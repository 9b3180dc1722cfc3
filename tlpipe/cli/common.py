"""What every command shares: one line for a user's error (``user_errors``), Unix usage lines,
and the options several commands take, each checked before any work."""
from __future__ import annotations

import re
from enum import Enum
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
import typer.core

from tlpipe.config import available_recipes
from tlpipe.errors import TlpipeError


class BareFlags:
    """Flags listed without a type: Typer 0.29 shows ``--json <bool>``, which invites ``--json true``."""

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class UnixUsage(BareFlags, typer.core.TyperCommand):
    """Usage lines as Unix tools write them (``tlpipe predict [OPTIONS] BUNDLE PATHS...``): Typer
    0.29 writes a required argument as ``{bundle}``, which reads as a literal to type."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if isinstance(p, typer.core.TyperArgument)]
        shown = [(a.metavar or a.name.upper()) + ("..." if a.nargs != 1 else "") for a in arguments]
        shown = [name if a.required else f"[{name}]" for a, name in zip(arguments, shown)]
        return [self.options_metavar, *shown] if self.options_metavar else shown


class Commands(BareFlags, typer.core.TyperGroup):
    """The ``tlpipe`` command group, its flags bare too."""


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


DEVICE_FORMS = "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N (GPU number N) or mps"
WEIGHTS_FORMS = "auto (the backbone's pretrained weights), none (random init) or the path of a .safetensors/.pt/.pth file"


def check_device(value: Optional[str]) -> Optional[str]:
    """A device torch cannot name fails here, before any data is read, with the forms it takes."""
    if value is None or re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return value
    raise typer.BadParameter(f"'{value}' is not a device: use {DEVICE_FORMS}")


def check_weights(value: Optional[str]) -> Optional[str]:
    """A typo in auto/none would otherwise be read as a file name and fail only after the data check."""
    if value is None or value in ("auto", "none") or Path(value).expanduser().is_file():
        return value
    raise typer.BadParameter(f"'{value}' is neither auto, none nor an existing file: use {WEIGHTS_FORMS}")


Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace output files that already exist.")]
Bundle = Annotated[Path, typer.Argument(help="A model bundle: <output>/model from tlpipe fit.")]
Recipe = Annotated[str, typer.Option(
    "--recipe", "-r", help=f"Recipe: {', '.join(available_recipes())}, or the path of a YAML file (see recipes/).")]
Backbone = Annotated[Optional[str], typer.Option(help="Backbone: `tlpipe models` lists offline ones; any timm name.")]
Weights = Annotated[Optional[str], typer.Option(callback=check_weights, help=f"Backbone weights: {WEIGHTS_FORMS}.")]
Layer = Annotated[Optional[str], typer.Option(help="CNN-code tap: penultimate, a feature index (0, -2) or module name; several joined by + are concatenated.")]
ImageSize = Annotated[Optional[int], typer.Option(help="Input resolution (default: the backbone's).")]
BatchSize = Annotated[Optional[int], typer.Option(help="Images per batch.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="DataLoader worker processes.")]
Device = Annotated[Optional[str], typer.Option(callback=check_device, help=f"Device: {DEVICE_FORMS}.")]
TableRoot = Annotated[Optional[Path], typer.Option(help="With a table: the folder its image paths are relative to (default: the table's).")]
PathColumn = Annotated[Optional[str], typer.Option(help="With a table: the column of image paths (default: path, file, filename, image...).")]
LabelColumn = Annotated[Optional[str], typer.Option(help="With a table: the column of labels (default: label, class, category, target...).")]
class Task(str, Enum):
    auto = "auto"
    multiclass = "multiclass"
    multilabel = "multilabel"


TableTask = Annotated[Optional[Task], typer.Option(help="With a table: multilabel (a cell holds ';'-separated labels), multiclass (one label a row, ';' and all), or auto (default: multi-label when a cell holds a ';').")]
SplitColumn = Annotated[Optional[str], typer.Option(help="With a table: the column of splits, train/val/test (default: split, subset, set; none: all train).")]
TimeLimit = Annotated[Optional[str], typer.Option(
    help="Time for the whole fit: 90s, 10m, 1.5h, 2h15m, or none (default: the recipe's budget, 30m for default).")]
