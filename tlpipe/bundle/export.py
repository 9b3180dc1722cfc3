"""Export: a bundle as one ONNX or TorchScript graph, proven to agree with the bundle before it is written.

The graph takes a batch of images already resized and cropped to the bundle's resolution
(``uint8`` 0..255 or ``float32`` 0..1, NCHW, any batch size) and returns calibrated class
probabilities: normalization, backbone, code tap, head, temperature and the test-time flip
averaging are all inside. The resize and crop stay outside (they depend on each image's size);
their rule travels in the ONNX metadata, the TorchScript extra files and the sidecar JSON.

Agreement is measured, not assumed: the exported file is run (ONNX Runtime, ``torch.jit.load``)
beside the bundle on the user's own validation images at batch sizes 1, 2 and 7, and a file that
disagrees is never moved into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from tlpipe.version import __version__
from tlpipe.bundle.folder import Bundle, load_bundle
from tlpipe.bundle.graph import INPUT, OUTPUT, UNKNOWN_OUTPUT, ExportedClassifier, InputType, pixels, preprocessing
from tlpipe.data import check_image
from tlpipe.data.scan import image_files
from tlpipe.errors import TlpipeError
from tlpipe.models.runtime import OPSET, onnx_graph
from tlpipe.paths import inside, output_file, sweep_temporaries
from tlpipe.run.folder import RunFolder
from tlpipe.utils import atomic_write, temporary_beside

Format = Literal["onnx", "torchscript"]
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".torchscript")}  # the first: the default file's
PARITY_BATCHES = (1, 2, 7)
MAX_DIFFERENCE = 1e-4
MAX_CHECK_IMAGES = 256


@dataclass
class Exported:
    """An export that passed its check (or was forced): where it is, what was measured, and what
    was logged to the fit's MLflow run."""

    path: Path
    sidecar: Path
    record: dict
    logged: str


@dataclass
class CheckSet:
    """The images agreement is proven on: the graph's input for them, the bundle's probabilities
    (CPU, float32), their classes where known, and where they came from."""

    images: list[Path]
    labels: list[int | None]
    source: str
    pixels: np.ndarray
    reference: np.ndarray
    thresholds: np.ndarray | None = None  # a multi-label bundle's: what it decides are label sets, not top-1s
    unknown: np.ndarray | None = None  # the bundle's unknown flags, where it has a detector


def export_bundle(bundle: Bundle, fmt: Format = "onnx", out: str | Path | None = None, *, input_type: InputType = "uint8",
                  check: str | Path | None = None, force: bool = False, overwrite: bool = False, log: bool = True) -> Exported:
    """Export ``bundle``, check it against the bundle, and move it to ``out`` only when it agrees
    (top-1, or a multi-label bundle's label set, on every image; probabilities within ``MAX_DIFFERENCE``) or ``force``. Default ``out``:
    ``<fit output>/export/model.onnx`` (``.pt`` for TorchScript), replaced by each export; a file the
    user names is replaced only with ``overwrite``. ``<out>.json`` beside it; the figures logged to
    the fit's MLflow run unless ``log`` is False."""
    if fmt not in SUFFIXES:
        raise TlpipeError(f"unknown export format '{fmt}': use onnx or torchscript")
    fit = RunFolder(bundle.path.parent)  # the default file is the fit's own: each export replaces it
    owned = out is None and (fit / fit.SUMMARY).is_file()
    out = output_file(out if out is not None else fit / fit.EXPORT / f"model{SUFFIXES[fmt][0]}", "--out",
                      suffixes=SUFFIXES[fmt], companions=[".json"], overwrite=overwrite or owned)
    sweep_temporaries(out.parent, of=out.name)  # what a killed export of this file left
    if bundle.device.type != "cpu":  # the reference is the bundle in float32, as the export runs
        bundle = load_bundle(bundle.path, "cpu")
    checks = check_set(bundle, check, input_type)
    meta = {"classes": bundle.classes, "preprocessing": preprocessing(bundle, input_type),
            "tlpipe_version": __version__, "bundle_sha256": bundle.manifest["head"]["sha256"],
            **({"task": "multilabel", "thresholds": [float(t) for t in bundle.head.thresholds]} if bundle.head.multilabel else {}),
            **({"unknown_threshold": bundle.unknowns.threshold} if bundle.unknowns else {})}
    module = ExportedClassifier(bundle, input_type).eval()
    path, exporter, parity = _export_checked(fmt, module, torch.from_numpy(checks.pixels[:2]), meta, checks, out)
    sidecar = out.with_name(out.name + ".json")
    try:
        if not parity["passed"] and not force:
            tried = "".join(f"; {note}" for note in exporter["exporter_notes"])
            raise TlpipeError(f"export refused, nothing written: {parity['verdict']}{tried}; give other images with "
                              "--check or write it anyway with --force")
        record = {"format": fmt, "file": out.name, "sha256": _sha256(path), "bytes": path.stat().st_size,
                  **exporter, "torch_version": torch.__version__, **meta, "bundle": str(bundle.path.resolve()),
                  "parity": {**parity, "images_from": checks.source, "forced": force and not parity["passed"]}}
        sidecar.unlink(missing_ok=True)  # killed between the two moves: a file without its sidecar, never a stale one
        os.replace(path, out)
    finally:
        path.unlink(missing_ok=True)
    atomic_write(sidecar, lambda f: f.write(json.dumps(record, ensure_ascii=False, indent=1)))
    logged = _log_to_fit_run(bundle, record, sidecar) if log else "Not logged to MLflow (log=False)"
    return Exported(out, sidecar, record, logged)


def _export_checked(fmt: Format, module: nn.Module, example: torch.Tensor, meta: dict, checks: CheckSet,
                    out: Path) -> tuple[Path, dict, dict]:
    """Each exporter of ``fmt`` in turn, each into a temporary file beside ``out``, until one's file
    agrees with the bundle (ONNX: the dynamo exporter, then the TorchScript-based one). Returns the
    file last measured, what made it (and why the ones before were dropped) and its parity."""
    attempts = [("dynamo", True), ("torchscript", False)] if fmt == "onnx" else [("torch.jit.trace", None)]
    notes, kept = [], None
    for name, dynamo in attempts:
        path = temporary_beside(out)
        try:
            write_onnx(module, example, path, meta, dynamo) if fmt == "onnx" else write_torchscript(module, example, path, meta)
            parity = check_parity(load_exported(path, fmt), checks, meta.get("unknown_threshold"))
        except Exception as exc:  # noqa: BLE001 - an exporter that fails, or writes what cannot run: the next one
            path.unlink(missing_ok=True)
            notes.append(f"the {name} exporter failed: {type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0][:200]}")
            continue
        except BaseException:  # Ctrl+C: no temporary file left behind
            for leftover in (path, *(kept[:1] if kept else ())):
                leftover.unlink(missing_ok=True)
            raise
        if kept:
            kept[0].unlink(missing_ok=True)
        kept = (path, name, parity)
        if parity["passed"]:
            break
        notes.append(f"the {name} exporter's graph was dropped: {parity['verdict']}")
    if kept is None:
        raise TlpipeError(f"{fmt} export failed, nothing written ({'; '.join(notes)})"
                          + ("; try --format torchscript" if fmt == "onnx" else ""))
    path, name, parity = kept
    return path, {"exporter": name, **({"opset": OPSET} if fmt == "onnx" else {}), "exporter_notes": notes}, parity


def _log_to_fit_run(bundle: Bundle, record: dict, sidecar: Path) -> str:
    """The parity figures and the sidecar on the MLflow run of the fit that made the bundle, when
    its ``summary.json`` is beside it; what was done, as one line."""
    from tlpipe.run.store import check_store
    from tlpipe.run.tracking import FitRun

    try:
        summary = RunFolder(bundle.path.parent).read_summary()
        run_id, uri = summary["run_id"], summary["tracking_uri"]
    except (TlpipeError, KeyError):
        return "Not logged to MLflow: no summary.json of the fit beside the bundle"
    fmt = record["format"]
    figures = {f"export_{fmt}_batch{size}_{key}": row[key] for size, row in record["parity"]["batches"].items()
               for key in ("top1_agreement", "max_abs_difference")}
    try:
        run = FitRun.attach(run_id, check_store(uri))  # a store that does not answer: seconds, not minutes of retries
        run.log_metrics(figures)
        run.log_artifact(sidecar, "export")
    except Exception as exc:  # noqa: BLE001 - the file and its sidecar are written: the run is one more copy
        return f"Not logged to MLflow run {run_id} ({type(exc).__name__}: {(str(exc) or '?').splitlines()[0][:160]})"
    return f"Logged to MLflow run {run_id} ({uri}): parity figures and export/{sidecar.name}"


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path, meta: dict, dynamo: bool) -> None:
    """ONNX at opset ``OPSET`` with a dynamic batch axis, the metadata as JSON strings under their keys:
    one exporter's file, unchecked (``export_bundle`` checks it; ``dynamo`` False: the TorchScript-based
    exporter, its fallback)."""
    import onnx

    onnx_graph(module, example, path, dynamo=dynamo, names=(INPUT, OUTPUT, *([UNKNOWN_OUTPUT] if module.rejects else [])))
    model = onnx.load(str(path))
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value, ensure_ascii=False))
    onnx.save(model, str(path))


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    """A traced TorchScript module with the metadata as its ``tlpipe.json`` extra file; unchecked, as ``write_onnx``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the tracer's notes on fixed shapes
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"tlpipe.json": json.dumps(meta, ensure_ascii=False)})


def load_exported(path: Path, fmt: Format) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]:
    """A function running the exported file as a deployment would (ONNX Runtime on CPU, or the
    TorchScript module loaded back on its own): pixels in, (probabilities, unknown scores or None) out."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: (*session.run(None, {INPUT: batch}), None)[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.inference_mode():
            out = module(torch.from_numpy(batch))
        return (out[0].numpy(), out[1].numpy()) if isinstance(out, tuple) else (out.numpy(), None)
    return run


def check_set(bundle: Bundle, check: str | Path | None, input_type: InputType = "uint8") -> CheckSet:
    """Up to ``MAX_CHECK_IMAGES`` readable images with their class (None when unknown): those under
    ``check`` (a class folder's name gives its images' class), else the fit's validation images;
    with the graph's input for them and the bundle's probabilities."""
    if check is not None:
        check = Path(check)
        found = image_files(check) if check.is_dir() else [check] if check.is_file() else []
        named, source = [(p, p.parent.name) for p in found], str(check)
    else:
        named, source = _validation_images(bundle), "validation"
    named = [(p, c) for p, c in _spread(named) if check_image(p) is None]
    if not named:
        raise TlpipeError(f"--check {check}: no readable image files there; give a folder of images" if check is not None else
                          f"no validation images found for {bundle.path} (its fit's summary.json and val_predictions.csv, "
                          "or the images they name, are not there): give images with --check DIR")
    images = [p for p, _ in named]
    multilabel = bundle.head.multilabel  # no accuracy of label sets here: parity is what is checked
    labels = [None if multilabel or c not in bundle.classes else bundle.classes.index(c) for _, c in named]
    codes = bundle.codes(images, onnx_runtime=False)  # the reference is PyTorch's
    scored = bundle.unknown_scores(codes)
    return CheckSet(images, labels, source, pixels(bundle, images, input_type), bundle.head.predict_proba(codes),
                    bundle.head.thresholds if multilabel else None, None if scored is None else scored[1])


def _validation_images(bundle: Bundle) -> list[tuple[Path, str]]:
    """(image, class) of the validation split of the fit that made ``bundle``, from its output folder."""
    fit = RunFolder.saved(bundle.path)
    if fit is None:
        return []
    try:
        data = Path(fit.summary.get("data_root") or fit.summary["data"])  # a table's rows are under its root
        rows = [(inside(data, row["path"]), row["true"]) for row in fit.folder.val_predictions()]
    except (TlpipeError, OSError, KeyError, ValueError, TypeError):  # a damaged CSV, a summary edited by hand
        return []
    return [(path, label) for path, label in rows if path is not None and path.is_file()]


def _spread(items: list) -> list:
    """At most ``MAX_CHECK_IMAGES`` items, evenly spread over the list (so over the classes too)."""
    if len(items) <= MAX_CHECK_IMAGES:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, MAX_CHECK_IMAGES).round().astype(int)]


def check_parity(run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]], checks: CheckSet,
                 threshold: float | None = None) -> dict:
    """The exported model (``run``: pixels in, probabilities and unknown scores out) against the bundle
    on ``checks`` at each of ``PARITY_BATCHES``: top-1 agreement (``top1_agreement``; multi-label:
    identical label sets; with an unknown ``threshold``, identical unknown flags too), the largest
    probability difference, and each one's accuracy where the class is known."""
    reference, known = checks.reference, np.array([label is not None for label in checks.labels])
    truth = np.array([-1 if label is None else label for label in checks.labels])
    accuracy = (lambda p: float((p.argmax(1) == truth)[known].mean())) if known.any() else (lambda p: None)
    if checks.thresholds is None:
        same = lambda p: p.argmax(1) == reference.argmax(1)  # noqa: E731
    else:  # a multi-label image agrees when its whole set of classes does
        same = lambda p: ((p >= checks.thresholds) == (reference >= checks.thresholds)).all(axis=1)  # noqa: E731
    rows = {}
    for size in PARITY_BATCHES:
        outputs = [run(checks.pixels[i:i + size]) for i in range(0, len(checks.pixels), size)]
        probabilities = np.concatenate([p for p, _ in outputs])
        agree = same(probabilities)
        if checks.unknown is not None:
            agree &= (np.concatenate([u for _, u in outputs]) > threshold) == checks.unknown
        rows[str(size)] = {
            "top1_agreement": float(agree.mean()),
            "max_abs_difference": float(np.abs(probabilities - reference).max()),
            "accuracy": accuracy(probabilities),
        }
    worst = min(rows.items(), key=lambda kv: (kv[1]["top1_agreement"], -kv[1]["max_abs_difference"]))
    passed = all(r["top1_agreement"] == 1.0 and r["max_abs_difference"] <= MAX_DIFFERENCE for r in rows.values())
    verdict = (f"at batch {worst[0]} the export agrees with the bundle on {worst[1]['top1_agreement']:.1%} of "
               f"{len(reference)} images, probabilities within {worst[1]['max_abs_difference']:.1e} (needed: 100% and {MAX_DIFFERENCE:g})")
    return {"images": len(reference), "batches": rows, "passed": passed, "verdict": verdict,
            "bundle_accuracy": accuracy(reference)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
