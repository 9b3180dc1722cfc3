"""The fit's time budget: ``--time-limit`` parsed, one clock every stage reads, and clean stops.

``Budget(parse_duration("10m"))`` starts the clock when the fit starts; ``left()`` is what every
later stage plans with (the study's timeout, whether a trial may start, whether an epoch may run).
The budget is kept by not starting work that cannot finish, never by killing work half-done.

``stop_on_signals()`` turns SIGTERM and Ctrl+C (SIGINT) into ``FitCut`` raised in the main thread,
so a stopped fit unwinds through its ``finally`` blocks and records the best model it has. A
signal that lands where Python swallows exceptions (a garbage collector's weakref callback, a
``__del__``) is raised again by ``raise_if_stopped()`` at the next batch, progress step or stage.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tlpipe.errors import TlpipeError

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(h|m|s)")
NO_LIMIT = ("none", "off", "inf")


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds in ``text``: ``90s``, ``10m``, ``1.5h``, ``2h15m``, a bare number of seconds; None
    for ``none`` (no limit). Raises ``TlpipeError`` with the accepted forms otherwise."""
    if text is None or (isinstance(text, str) and text.strip().lower() in NO_LIMIT):
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        compact = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d*)?", compact):
            seconds = float(compact)
        elif compact and _PART.sub("", compact) == "":
            seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in _PART.findall(compact))
        else:
            raise TlpipeError(f"time limit '{text}' is not a duration: use e.g. 90s, 10m, 1.5h, 2h15m or none")
    if not math.isfinite(seconds) or seconds <= 0:
        raise TlpipeError(f"time limit '{text}' must be more than 0 seconds (or none for no limit)")
    return seconds


def format_duration(seconds: float) -> str:
    """``seconds`` as a ``--time-limit`` value, rounded up: 90 -> 1m30s, 7800 -> 2h10m."""
    seconds = math.ceil(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:  # to the minute, up
        minutes += secs > 0
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    return f"{secs}s"


def every_image_line(limit: float | None, used: int, total: int) -> str:
    """The ``--time-limit`` that would let a fit that used ``used`` of ``total`` images use them all
    (its stages' costs grow with the images), rounded up to 5 minutes; "" without a limit."""
    if not limit:
        return ""
    return f": --time-limit {format_duration(math.ceil(limit * total / used / 300) * 300)} or more would use every image"


@dataclass
class Budget:
    """The fit's clock: ``limit`` seconds (None: no limit) from ``started`` (``time.monotonic``)."""

    limit: float | None
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        """Seconds left; infinite without a limit."""
        return math.inf if self.limit is None else self.limit - self.elapsed()

    def timeout(self, reserve: float = 0.0, share: float = 1.0) -> float | None:
        """Seconds for work that may take ``share`` of the time left and must leave ``reserve``
        seconds; None: no limit."""
        return None if self.limit is None else max(share * self.left() - reserve, 0.0)

    def deadline(self, reserve: float = 0.0) -> float | None:
        """The ``time.monotonic()`` by which work must end to leave ``reserve`` seconds; None: no limit."""
        return None if self.limit is None else self.started + self.limit - reserve

    def to_dict(self) -> dict:
        return {"limit_seconds": self.limit, "elapsed_seconds": round(self.elapsed(), 1)}


class FitCut(BaseException):
    """The fit was stopped from outside (SIGTERM, Ctrl+C). A BaseException, like KeyboardInterrupt,
    so no ``except Exception`` on the way swallows it."""

    def __init__(self, reason: str, exit_code: int, output: Path | None = None, result: Any = None):
        super().__init__(reason)
        self.reason, self.exit_code = reason, exit_code
        self.output = output  # the fit's output folder: a re-run with it continues the fit
        self.result = result  # the FitResult recorded before the cut went on, when there is one

    def recorded(self, *, output: Path | None = None, result: Any = None) -> "FitCut":
        """This cut as the caller sees it, with what the fit left: a new exception (raised ``from``
        this one), not this one changed on its way up."""
        return FitCut(self.reason, self.exit_code, output or self.output, result or self.result)


_SIGNALS = {signal.SIGTERM: ("stopped by SIGTERM", 143), signal.SIGINT: ("interrupted (Ctrl+C)", 130)}


class _Stops:
    """The signal handler's state: while ``held`` (``signals_held``), a signal is kept in ``pending``
    and raised when the hold ends."""

    held = 0
    pending: int | None = None
    received: int | None = None  # the signal that cut the fit, until the cut is being recorded
    owner: int | None = None  # the pid that installed the handler: forked DataLoader workers inherit it


def _cut(signum, frame) -> None:
    if os.getpid() != _Stops.owner:  # a forked DataLoader worker still starting: its parent cuts, then stops it
        return
    if _Stops.held:
        _Stops.pending = signum
        return
    _Stops.received = signum
    raise FitCut(*_SIGNALS[signum])


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader's ``worker_init_fn``: SIGTERM and Ctrl+C sent to the whole process group (a
    terminal's Ctrl+C, systemd, ``kill -- -PGID``) leave the workers running, so the fit that owns
    them cuts cleanly and shuts them down; PyTorch's own handler would kill them, and the fit with
    them ("DataLoader worker is killed by signal", exit 1). A worker whose fit dies outright
    notices and exits (PyTorch's watchdog). A worker started by ``worker_options`` had the signals
    blocked until now: one that came meanwhile is dropped here, ignored."""
    for signum in _SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, list(_SIGNALS))


if hasattr(multiprocessing.context, "ForkProcess"):  # POSIX
    class _ShieldedFork(multiprocessing.context.ForkProcess):
        """A forked process that starts with SIGTERM and SIGINT blocked. Between a DataLoader worker's
        start and its ``worker_init_fn``, PyTorch's SIGTERM handler would kill it: a stop signal sent to
        the process group at that moment ended a fit with exit 1 instead of its cut (seen in CI)."""

        def start(self) -> None:
            held = signal.pthread_sigmask(signal.SIG_BLOCK, list(_SIGNALS))
            try:
                super().start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)

    class _ShieldedForkContext(multiprocessing.context.ForkContext):
        Process = _ShieldedFork


def worker_options(workers: int) -> dict[str, Any]:
    """DataLoader keywords for ``workers`` processes that live through a stop signal sent to the whole
    process group: they ignore it (``ignore_stop_signals``), and where the start method is fork (Linux
    before Python 3.14) they start with it blocked, so none lands before they do."""
    if workers == 0:
        return {"num_workers": 0}
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    context = _ShieldedForkContext() if method == "fork" and hasattr(signal, "pthread_sigmask") else None
    return {"num_workers": workers, "worker_init_fn": ignore_stop_signals, "multiprocessing_context": context}


def raise_if_stopped() -> None:
    """Raise the ``FitCut`` of a signal received since the fit's cut was last recorded: the
    handler's own raise may have landed where it is swallowed. Called where loops step."""
    if _Stops.received is not None and threading.current_thread() is threading.main_thread():
        raise FitCut(*_SIGNALS[_Stops.received])


def recording_cut() -> None:
    """The cut has reached the code that records it: later checks let that record be written."""
    _Stops.received = None


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise ``FitCut`` in the main thread for the block (elsewhere: nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Stops.owner, _Stops.received = os.getpid(), None
    previous, unraisable = {signum: signal.signal(signum, _cut) for signum in _SIGNALS}, sys.unraisablehook

    def swallowed(report) -> None:
        """A cut raised where Python cannot pass it on (a garbage collector's callback) would print
        "Exception ignored" and a traceback; ``raise_if_stopped`` raises it again at the next step."""
        if not isinstance(report.exc_value, FitCut):
            unraisable(report)

    sys.unraisablehook = swallowed
    try:
        yield
    finally:
        _Stops.received = None
        sys.unraisablehook = unraisable
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGTERM and Ctrl+C wait for the block to end (writing a bundle, a summary), then cut."""
    _Stops.held += 1
    try:
        yield
    finally:
        _Stops.held -= 1
    if not _Stops.held and _Stops.pending is not None:
        signum, _Stops.pending = _Stops.pending, None
        raise FitCut(*_SIGNALS[signum])
