"""ONNX Runtime for the frozen passes on a CPU (codes, transfer signals, val scoring, prediction).

The same EfficientNet-Lite0 graph runs 3-4x faster in ONNX Runtime than in PyTorch eager on a
2-core CPU (``bench/export_speed.py``), and a fit on a CPU spends most of its first minutes in
these passes. ``onnx_pass`` exports the module once per pass (its weights may have been
fine-tuned since the last one) with PyTorch's TorchScript-based exporter, about 2 s for Lite0,
and proves it: the session's output on two images must match PyTorch's, or the pass stays in
PyTorch. Any failure (a model the exporter cannot trace, no onnxruntime) also leaves the pass in
PyTorch, which gives the same codes, slower.
"""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)
OPSET = 18  # run by ONNX Runtime >= 1.14 and most converters

ORT_MIN_IMAGES = 128  # below this many images, the export (about 2 s) costs more than it saves
TOLERANCE = 1e-3  # max |difference| allowed, relative to the largest |value| of the reference batch

Runner = Callable[[torch.Tensor], torch.Tensor]


def onnx_pass(module: nn.Module, images: torch.Tensor) -> Runner | None:
    """``module`` (in eval mode, frozen) as an ONNX Runtime session for batches shaped like
    ``images`` (any batch size): traced on its first image, proven on its first two against
    PyTorch (a batch size the trace did not see, and an image it did not); None where it cannot be
    exported or does not match."""
    try:
        import onnxruntime
    except ImportError:
        return None
    reference = module(images[:2]).float().cpu()
    try:
        run = _runner(_session(module, images[:1], onnxruntime))
        got = run(images[:2])
    except Exception as exc:  # noqa: BLE001 - any exporter or runtime failure: PyTorch runs the pass
        log.info("ONNX Runtime not used for this pass: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    difference = (got - reference).abs().max().item() if got.shape == reference.shape else float("inf")
    if not difference <= TOLERANCE * max(reference.abs().max().item(), 1.0):
        log.info("ONNX Runtime not used for this pass: its output differs from PyTorch's by %g", difference)
        return None
    return run


def _session(module: nn.Module, images: torch.Tensor, onnxruntime):
    buffer = io.BytesIO()
    example = images.detach().clone().contiguous()  # a normal tensor: tracing refuses inference-mode ones
    with torch.inference_mode(False):
        onnx_graph(module, example, buffer)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    options.log_severity_level = 3  # errors only: it warns about unused initializers of pruned taps
    # Idle threads sleep instead of spinning: the DataLoader's workers decode on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def _runner(session) -> Runner:
    def run(images: torch.Tensor) -> torch.Tensor:
        array = images.contiguous().numpy()
        return torch.from_numpy(session.run(None, {"images": array})[0])

    return run


def onnx_graph(module: nn.Module, example: torch.Tensor, target: Path | io.BytesIO, *, dynamo: bool = False,
               names: tuple[str, ...] = ("images", "out")) -> None:
    """``module`` traced on ``example`` as ONNX at ``OPSET`` with a dynamic batch axis, written to
    ``target`` (a file, or a buffer when not ``dynamo``): the one exporter call, for the passes here
    and for ``tlpipe export``. ``dynamo``: torch.export's exporter, else the TorchScript-based one."""
    if dynamo and not isinstance(target, Path):
        raise ValueError("torch.export's exporter writes files only: give a path")
    inputs, *outputs = names
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation, the tracer's notes on fixed shapes
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=[inputs],
                                        output_names=outputs, dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(target), external_data=False)
        else:
            torch.onnx.export(module, (example,), target if isinstance(target, io.BytesIO) else str(target), dynamo=False,
                              opset_version=OPSET, input_names=[inputs], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in (inputs, *outputs)})
