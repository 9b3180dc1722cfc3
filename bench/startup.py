"""How soon each command answers: seconds to its first line and to its exit, against ``python -c
"import torch"`` measured in the same run (the floor of any command that runs a model).

Run from a checkout with tlpipe installed:  ``python bench/startup.py [--repeat 3]``.
It writes a tiny dataset (2 classes x 8 noisy one-colour JPEGs) and fits it once (linear, no tuning,
not timed) in a temporary folder, then runs each command ``--repeat`` times in a pseudo-terminal, as
a user at a shell sees it (progress lines and announcements are drawn only for a terminal), and
prints the medians. Acceptance (issue 27): a mistyped path <= 1.5 s, ``--help`` <= 1 s, ``predict``
of one image <= 4 s.
"""
from __future__ import annotations

import argparse
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def timed(command: list[str], cwd: Path) -> tuple[float, float, float, int]:
    """(seconds to the first output byte, to exit, from the last output byte to exit, exit code) of
    ``command`` on a pseudo-terminal."""
    leader, follower = pty.openpty()
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                               env={**os.environ, "COLUMNS": "160"})
    os.close(follower)
    first = last = None
    while True:
        ready, _, _ = select.select([leader], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                chunk = b""
            if chunk:
                last = time.monotonic() - start
                first = last if first is None else first
            if not chunk:
                break
        elif process.poll() is not None:
            break
    code = process.wait()
    os.close(leader)
    end = time.monotonic() - start
    return first if first is not None else end, end, end - (last if last is not None else end), code


def tiny_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
        for split, n in (("train", 8), ("val", 4)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.jpg")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tlpipe = [sys.executable, "-m", "tlpipe"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tiny_dataset(tmp / "data")
        env_store = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        os.environ.update(env_store)
        subprocess.run([*tlpipe, "fit", str(data), "-o", str(tmp / "out"), "--strategy", "linear", "--trials", "0",
                        "--workers", "0"], check=True, capture_output=True)
        image = next((data / "val" / "class0").iterdir())
        commands = {
            "import torch (reference)": [sys.executable, "-c", "import torch"],
            "tlpipe --help": [*tlpipe, "--help"],
            "fit MISTYPED_PATH": [*tlpipe, "fit", str(tmp / "no-such-folder")],
            "predict BUNDLE MISTYPED": [*tlpipe, "predict", str(tmp / "no-such-bundle"), str(image)],
            "predict BUNDLE 1 image": [*tlpipe, "predict", str(tmp / "out" / "model"), str(image)],
            "evaluate BUNDLE DATA": [*tlpipe, "evaluate", str(tmp / "out" / "model"), str(data), "--split", "val"],
            "models": [*tlpipe, "models"],
            "fit DATA (linear, no tuning)": [*tlpipe, "fit", str(data), "-o", str(tmp / "again"), "--strategy", "linear",
                                             "--trials", "0", "--workers", "0"],
        }
        rows = {}
        for name, command in commands.items():
            runs = [timed(command, tmp) for _ in range(args.repeat)]
            rows[name] = (*(statistics.median(r[i] for r in runs) for i in range(3)), runs[-1][3])
    torch_exit = rows["import torch (reference)"][1]
    print(f"{'command':32s} {'first line s':>12s} {'exit s':>8s} {'exit / import torch':>20s} "
          f"{'last line to exit s':>20s} {'code':>5s}")
    for name, (first, end, linger, code) in rows.items():
        print(f"{name:32s} {first:12.2f} {end:8.2f} {end / torch_exit:20.2f} {linger:20.2f} {code:5d}")


if __name__ == "__main__":
    main()
