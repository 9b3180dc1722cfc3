"""Does a model say ``unknown`` to images of nothing it knows, the same way everywhere it runs?

Fits ``../shared/data/hymenoptera`` with the default recipe (once: a finished fit in OUT/fit is
reused), then feeds its bundle the val images of hymenoptera (its own classes: the share flagged is
the false rejection, set for 5%) and of dtd10, bloodcells and rsscn7 (nothing it knows: the share
flagged should be high), through three paths: the bundle (``tlpipe predict``'s), its ONNX export
run by ONNX Runtime, and a real ``tlpipe serve`` answering HTTP requests.

Run from the repo root:  python bench/unknowns.py /tmp/unknowns   (about 4 min on 2 cores)
"""
from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SETS = ("hymenoptera", "dtd10", "bloodcells", "rsscn7")


def served(port: int, images: list[Path]) -> list[bool]:
    """The ``unknown`` flags ``tlpipe serve`` answers for ``images`` (64 a request)."""
    flags = []
    for i in range(0, len(images), 64):
        rows = [[base64.b64encode(p.read_bytes()).decode()] for p in images[i:i + 64]]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
        flags += [row["unknown"] for row in json.loads(urllib.request.urlopen(request, timeout=300).read())["predictions"]]
    return flags


def start_server(fit: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tlpipe", "serve", str(fit), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server, port
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("tlpipe serve did not answer within 4 minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    fit = args.out / "fit"
    if not (fit / "summary.json").is_file():
        subprocess.run([sys.executable, "-m", "tlpipe", "fit", str(SHARED / "hymenoptera"), "-o", str(fit)],
                       check=True, stdout=subprocess.DEVNULL)
    import onnxruntime as ort

    from tlpipe.bundle.export import export_bundle
    from tlpipe.bundle.graph import pixels
    from tlpipe.bundle.folder import load_bundle
    from tlpipe.data.scan import image_files

    bundle = load_bundle(fit / "model", "cpu")
    exported = export_bundle(bundle, "onnx", args.out / "model.onnx", overwrite=True, log=False)
    session, threshold = ort.InferenceSession(str(exported.path)), exported.record["unknown_threshold"]
    server, port = start_server(fit)
    summary = json.loads((fit / "summary.json").read_text())
    print(f"hymenoptera model: {summary['strategy']} at {summary['layer']}, val accuracy {summary['val_accuracy']:.3f}; "
          f"unknown threshold {threshold:.1f} ({bundle.unknowns.false_rejection:.0%} of val)")
    try:
        for name in SETS:
            images = image_files(SHARED / name / "val")
            through_bundle = [p.unknown for p in bundle.predict(images)]
            through_onnx = [bool(s > threshold) for i in range(0, len(images), 32)
                            for s in session.run(None, {"images": pixels(bundle, images[i:i + 32])})[1]]
            through_serve = served(port, images)
            shares = [np.mean(flags) for flags in (through_bundle, through_onnx, through_serve)]
            print(f"  {name:12s} {len(images):4d} val images flagged unknown: bundle {shares[0]:.1%}, ONNX {shares[1]:.1%}, "
                  f"serve {shares[2]:.1%}; the three agree on {np.mean(np.array(through_bundle) == through_onnx):.1%} / "
                  f"{np.mean(np.array(through_bundle) == through_serve):.1%}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
