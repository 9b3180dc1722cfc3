"""Rich progress bars and announcements that stay quiet when the output is not a terminal (CI
logs, pipes: the report at the end says it all there)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
        yield lambda n=1: progress.advance(task, n)
