"""Images/s of an exported model against PyTorch eager on the same module, measured in the same run.

    python bench/export_speed.py runs/hymenoptera/model [--batch 32] [--repeats 5] [--threads N]

Exports the bundle (ONNX and TorchScript, each checked against the bundle as ``tlpipe export``
does) into a temporary folder, then times batches of preprocessed uint8 pixels (decoding and
resizing excluded, the same tensors for every runner): ONNX Runtime (CPU provider), the TorchScript
file loaded back, and the eager ``ExportedClassifier`` (contiguous and channels_last). Prints the
median images/s of each and its ratio to eager, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def images_per_second(run, batch: np.ndarray, repeats: int) -> float:
    run(batch)  # warm-up: allocations, graph optimization, oneDNN kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def eager_runner(module: torch.nn.Module, channels_last: bool):
    module = module.eval().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch)
        with torch.inference_mode():
            return module(x.to(memory_format=torch.channels_last) if channels_last else x).numpy()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (ONNX Runtime: its default, one per core)")
    args = parser.parse_args()

    from tlpipe.bundle import load_bundle
    from tlpipe.bundle.export import export_bundle, load_exported
    from tlpipe.bundle.graph import ExportedClassifier

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        onnx_file = export_bundle(bundle, "onnx", Path(folder) / "m.onnx", log=False).path
        script_file = export_bundle(bundle, "torchscript", Path(folder) / "m.pt", log=False).path
        rng = np.random.default_rng(0)
        size = bundle.backbone.data_config["input_size"][1:]
        batch = rng.integers(0, 256, (args.batch, 3, *size), dtype=np.uint8)  # decoding is not what is measured
        runners = {
            "eager": eager_runner(ExportedClassifier(bundle), channels_last=False),
            "eager channels_last": eager_runner(ExportedClassifier(bundle), channels_last=True),
            "onnxruntime": load_exported(onnx_file, "onnx"),
            "torchscript": load_exported(script_file, "torchscript"),
        }
        speeds = {name: images_per_second(run, batch, args.repeats) for name, run in runners.items()}
    reference = speeds["eager"]
    print(f"{args.bundle} at {size[0]}x{size[1]}, batch {args.batch}, {torch.get_num_threads()} threads")
    for name, speed in speeds.items():
        print(f"  {name:20s} {speed:8.1f} images/s   x{speed / reference:.2f} vs eager")
    print(json.dumps({"bundle": str(args.bundle), "batch": args.batch, "threads": torch.get_num_threads(),
                      "images_per_second": {k: round(v, 1) for k, v in speeds.items()},
                      "ratio_to_eager": {k: round(v / reference, 3) for k, v in speeds.items()}}))


if __name__ == "__main__":
    main()
