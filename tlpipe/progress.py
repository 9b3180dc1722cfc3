"""What a fit says while it runs: rich progress bars and announcements that stay quiet when the
output is not a terminal (CI logs, pipes: the report at the end says it all there), and the
libraries' own INFO lines (Optuna: one per trial; MLflow's store) kept out of the way."""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tlpipe.budget import raise_if_stopped

console = Console(stderr=True)


def announce(message: str) -> None:
    """One line on stderr for an interactive terminal: what a long stage is about to do, and why."""
    if console.is_terminal:
        console.print(message)


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)``; the bar is drawn on stderr only for interactive terminals."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total, completed=completed)

        def advance(n: int = 1) -> None:
            progress.advance(task, n)
            raise_if_stopped()  # a signal's cut the loop did not see

        yield advance


@contextmanager
def quiet_libraries(quiet: bool = True) -> Iterator[None]:
    """Optuna's and MLflow's loggers at WARNING for the block, SQLAlchemy's at CRITICAL (their levels
    are restored after): the fit's report says what the study and the store did. scikit-learn's
    guess that many classes of few images "could represent a regression problem" is silenced: the
    labels are classes, and the report says when a class is too small to cross-validate."""
    if not quiet:
        yield
        return
    import optuna

    verbosity, loggers = optuna.logging.get_verbosity(), [logging.getLogger(n) for n in ("mlflow", "alembic", "sqlalchemy")]
    levels = [logger.level for logger in loggers]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    # A SIGTERM that lands inside a store query makes SQLAlchemy log "Error closing cursor" with a
    # traceback while the cut unwinds; the query's own error, if any, is raised, not logged.
    loggers[-1].setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%", category=UserWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
