"""Shared test helpers: small real image files and folders, the integration data, folder snapshots.

Plain functions (``from conftest import make_image, tree_snapshot, shared_dataset``) plus the
``image_folder`` fixture, which returns a factory for folder-per-class datasets, and ``bundle_dir``,
one small real fit the whole session shares (copy it before changing it).
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pytest
from PIL import Image

# ../shared/data next to the repository: the real datasets integration tests run on.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Well-separated class colours: a linear probe on real CNN features tells them apart easily.
CLASS_COLORS = [
    (220, 40, 40), (40, 170, 60), (40, 70, 220), (235, 205, 40), (160, 50, 200),
    (40, 200, 210), (245, 130, 30), (30, 30, 30), (235, 235, 235), (140, 90, 40),
]


def class_color(index: int) -> tuple[int, int, int]:
    """A distinct colour for class ``index`` (the fixed list first, then seeded random ones)."""
    if index < len(CLASS_COLORS):
        return CLASS_COLORS[index]
    rng = np.random.default_rng(1000 + index)
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def make_image(
    path: str | Path,
    color: tuple[int, ...] = (128, 128, 128),
    size: tuple[int, int] = (48, 40),
    mode: str = "RGB",
    fmt: str | None = None,
    noise: int = 0,
    seed: int | Sequence[int] = 0,
    **save_kwargs,
) -> Path:
    """Write a small real image file with Pillow (parent folders created) and return its path.

    ``color`` is an RGB triple, or a tuple with one value per band of ``mode`` (RGBA with alpha,
    CMYK, ...), used as is. Otherwise the RGB picture is converted to ``mode`` (L, P, LA, ...).
    ``noise`` adds seeded uniform noise of that amplitude to each RGB channel. ``fmt`` is the
    Pillow format name; by default Pillow picks it from the extension (any letter case).
    ``save_kwargs`` go to ``Image.save`` (``exif=``, ``quality=``, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    bands = Image.getmodebands(mode)
    if mode not in ("RGB", "P", "L", "1") and len(color) == bands and not noise:
        img = Image.new(mode, size, tuple(color))
    else:
        rgb = np.empty((height, width, 3), dtype=np.int16)
        rgb[...] = np.asarray(color[:3], dtype=np.int16) if len(color) >= 3 else color[0]
        if noise:
            rng = np.random.default_rng(seed)
            rgb += rng.integers(-noise, noise + 1, size=rgb.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        if mode == "P":  # an adaptive palette keeps the colours (the default web palette does not)
            img = img.convert("P", palette=Image.Palette.ADAPTIVE)
        elif mode != "RGB":
            img = img.convert(mode)
    img.save(path, format=fmt, **save_kwargs)
    return path


def _split_counts(classes: Mapping[str, int], split) -> dict[str, dict[str, int]]:
    """Normalise ``split`` (None, names, or name -> per-class count / {class: count}) to counts."""
    if split is None:
        return {"": dict(classes)}
    if isinstance(split, str):
        split = [split]
    if not isinstance(split, Mapping):
        return {name: dict(classes) for name in split}
    out = {}
    for name, counts in split.items():
        if isinstance(counts, Mapping):
            out[name] = dict(counts)
        else:
            out[name] = {c: int(counts) for c in classes}
    return out


@pytest.fixture
def image_folder(tmp_path):
    """Factory ``make_dataset(root, {"cats": 6, "dogs": 6}, split=None, ...) -> root``.

    Writes ``root/<class>/<class>_NNN.jpg`` images, each class a distinct solid colour with a
    little seeded noise. ``root`` may be relative to ``tmp_path``. ``split`` puts the class
    folders under split folders: a list of names (``["train", "val"]``: each gets the same
    counts), or a mapping ``{"train": {...counts...}, "val": 2}`` (an int = that many per class).
    Colours follow the order of ``classes``, so a class keeps its colour in every split.
    """

    def make_dataset(
        root: str | Path,
        classes: Mapping[str, int] = None,
        split: Iterable[str] | Mapping[str, int | Mapping[str, int]] | str | None = None,
        ext: str = ".jpg",
        size: tuple[int, int] = (48, 40),
        noise: int = 12,
        seed: int = 0,
    ) -> Path:
        classes = {"cats": 6, "dogs": 6} if classes is None else classes
        root = Path(root)
        root = root if root.is_absolute() else tmp_path / root
        root.mkdir(parents=True, exist_ok=True)
        index = {name: i for i, name in enumerate(classes)}
        for split_index, (split_name, counts) in enumerate(_split_counts(classes, split).items()):
            for name, n in counts.items():
                i = index.setdefault(name, len(index))
                for k in range(n):
                    make_image(
                        root / split_name / name / f"{name}_{k:03d}{ext}",
                        color=class_color(i), size=size, noise=noise,
                        seed=[seed, split_index, i, k],
                    )
        return root

    return make_dataset


def tlpipe(*args, env: dict | None = None):
    """``tlpipe ARGS`` in this process through Typer's runner (output captured, exit code kept);
    an exception that is not an exit is raised, so a crash fails the test with its traceback."""
    from typer.testing import CliRunner

    from tlpipe.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def health_status(port: int, timeout: float = 90) -> int | None:
    """The status of ``GET /health`` on 127.0.0.1:``port`` once the server answers (None: it never did)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
        except OSError:
            time.sleep(1)
    return None


def shared_dataset(name: str) -> Path:
    """``../shared/data/<name>``, or skip the test when that data is not on this machine."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"dataset {name!r} not found: integration data lives in ../shared/data ({path})")
    return path


def tree_snapshot(root: str | Path) -> dict[str, tuple[int, int, str | None]]:
    """``{relative path: (size, mtime_ns, sha256)}`` for ``root`` itself ('.') and every file and
    folder under it, hidden ones included (folders and links: sha256 None, never followed).
    Equal snapshots before and after a run mean the run never wrote to the folder."""
    root = Path(root)
    snapshot = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        digest = None
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        snapshot[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns, digest)
    return snapshot


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Every test logs to a throwaway SQLite MLflow store, never to ./mlflow.db of the checkout."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def backbone():
    """The default offline backbone (real ImageNet weights), loaded once for the session."""
    from tlpipe.models import create_backbone

    return create_backbone()


FAST = ["--strategy", "linear", "--trials", "0", "--workers", "0", "--device", "cpu"]  # a fit in seconds


def one_line(result, *fragments: str) -> None:
    """Exit 2 and a single stderr line holding every fragment."""
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def dataset(root: Path, classes, per_class: int = 6, split: dict | None = None) -> Path:
    """``root/<split>/<class>/<k>.jpg``: small noisy images, one colour per class."""
    for c, name in enumerate(classes):
        for split_name, n in (split or {"": per_class}).items():
            for k in range(n):
                make_image(root / split_name / name / f"{k}.jpg", class_color(c), size=(40, 32), noise=20, seed=[c, k, len(split_name)])
    return root


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def servers_on(port: int) -> list[int]:
    """Pids of live processes whose command line serves ``port`` (the MLflow server and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split(") ")[-1][0]
        except (OSError, IndexError):
            continue
        if str(port).encode() in cmdline and state != "Z" and any(b"mlflow" in part or b"uvicorn" in part for part in cmdline):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory):
    """(dataset, bundle) of one linear fit of two colour classes, shared by the session: copy before changing."""
    root = dataset(tmp_path_factory.mktemp("data") / "pets", ["cats", "dogs"])
    out = tmp_path_factory.mktemp("fit") / "out"
    assert tlpipe("fit", root, "-o", out, *FAST).exit_code == 0
    return root, out / "model"


def mlflow_serve_answer(summary: dict, images: list[Path], log: Path) -> list[dict]:
    """The predictions a real ``mlflow models serve`` of the fit's MLflow model answers for ``images``
    (base64 in a ``dataframe_split`` request); a server that does not start fails the test."""
    import base64
    import json
    import signal
    import subprocess
    import time
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", summary["mlflow_model"], "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": summary["tracking_uri"]}
    with log.open("w") as sink:
        server = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"mlflow models serve did not start: {log.read_text()[-600:]}")  # a crash is a failure
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]
                                                                                for p in images]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
