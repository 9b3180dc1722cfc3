"""The ``tlpipe`` command: thin Typer functions over the Python API (``tlpipe.pipeline`` & co),
one module per group of commands (``fit``; ``explore``: inspect, extract, models; ``bundle``:
predict, evaluate, export, suggest; ``run``: report, ui, serve), joined here; ``common`` holds what they share.

Every ``TlpipeError`` becomes one line on stderr and exit code 2; nothing here holds logic that
the API lacks.
"""
from __future__ import annotations

import gc
import os
from typing import Annotated

import typer

from tlpipe.cli import bundle, explore, fit, run
from tlpipe.cli.common import Commands

app = typer.Typer(
    cls=Commands,
    help="Transfer-learning AutoML for image classification: from a folder of images to the best "
    "classifier a pretrained CNN can give, with every choice explained and recorded in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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


for commands in (fit.app, explore.app, bundle.app, run.app):
    app.add_typer(commands)


def main() -> None:
    try:
        app(prog_name="tlpipe")
    finally:
        # The command is done. Left alone, the collector's passes over the ~400,000 objects torch and timm
        # hold while the interpreter shuts down keep the prompt waiting over a second (bench/startup.py).
        gc.freeze()

