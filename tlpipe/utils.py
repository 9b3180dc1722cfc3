"""Small helpers shared by every stage: atomic writes, JSON, and the default worker count."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it), and put back
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w", **open_kwargs) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary sibling, then rename it in place,
    so a killed process leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def temporary_beside(path: Path) -> Path:
    """A new empty temporary file next to ``path``, named ``.NAME.PID.RANDOM.tmp`` so that
    ``tlpipe.paths.sweep_temporaries`` can tell whether the process writing it is still alive."""
    handle, name = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    os.chmod(name, 0o666 & ~_UMASK)  # a plain file's mode, as open() gives: mkstemp's 0600 would hide outputs from a team
    return Path(name)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, lambda f: json.dump(data, f, indent=2, default=str), mode="w")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def default_workers(requested: int | None = None) -> int:
    """DataLoader processes or decoding threads: ``requested`` when the user names a count, else
    one per core this process may use, at most 4 (more only add start-up time and memory)."""
    if requested is not None:
        return requested
    return min(4, cpu_cores())


def cpu_cores() -> int:
    """The cores this process may use (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
