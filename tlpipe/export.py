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

import csv
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from tlpipe import __version__
from tlpipe.bundle import Bundle, expand_image_paths
from tlpipe.data import eval_transform, load_rgb
from tlpipe.data.loader import decode_size
from tlpipe.errors import TlpipeError
from tlpipe.utils import atomic_write, read_json

Format = Literal["onnx", "torchscript"]
InputType = Literal["uint8", "float32"]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 18  # ONNX Runtime >= 1.14 runs it; the dynamo exporter's own default
INPUT, OUTPUT = "images", "probabilities"
PARITY_BATCHES = (1, 2, 7)
MAX_DIFFERENCE = 1e-4
MAX_CHECK_IMAGES = 256


class ExportedClassifier(nn.Module):
    """Pixels in, calibrated probabilities out: what ``Bundle.predict_proba`` computes after the
    resize and crop, as one module with no Python-side state."""

    def __init__(self, bundle: Bundle, input_type: InputType = "uint8"):
        super().__init__()
        config = bundle.backbone.data_config
        self.extractor = bundle.extractor
        self.from_uint8 = input_type == "uint8"
        self.register_buffer("mean", torch.tensor(config["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config["std"], dtype=torch.float32).view(1, 3, 1, 1))
        head = bundle.head.tensors()
        self.register_buffer("weight", head["weight"].float())
        self.register_buffer("bias", head["bias"].float())
        self.register_buffer("scale", head["scale"].float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.from_uint8:
            x = x / 255.0
        codes = self.extractor((x - self.mean) / self.std)
        return torch.softmax((codes @ self.weight.T + self.bias) * self.scale, dim=1)


def preprocessing(bundle: Bundle, input_type: InputType) -> dict:
    """How to turn an image file into the graph's input, as timm's eval transform does it."""
    config = bundle.backbone.data_config
    return {
        "resize_shorter_side": decode_size(config), "interpolation": config["interpolation"],
        "crop_mode": config.get("crop_mode", "center"), "crop": list(config["input_size"][1:]),
        "mean": list(config["mean"]), "std": list(config["std"]),
        "input": {"name": INPUT, "layout": "NCHW", "channels": "RGB", "dtype": input_type,
                  "range": "0..255" if input_type == "uint8" else "0..1"},
        "output": {"name": OUTPUT, "shape": ["batch", len(bundle.classes)], "meaning": "class probabilities, calibrated"},
        "test_time_hflip": bool(bundle.manifest["codes"].get("hflip", False)),
    }


def pixels(bundle: Bundle, images: Sequence[Path | Image.Image], input_type: InputType = "uint8") -> np.ndarray:
    """The graph's input for ``images`` (files or decoded pictures): decoded as ``tlpipe predict``
    decodes them, then resized and cropped by the bundle's rule; (N, 3, H, W)."""
    config = bundle.backbone.data_config
    geometry = eval_transform(config).transforms[:-2]  # timm's Resize + CenterCrop, before ToTensor + Normalize
    batch = []
    for image in images:
        picture = image if isinstance(image, Image.Image) else load_rgb(image, decode_size(config))
        for step in geometry:
            picture = step(picture)
        batch.append(np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1))
    out = np.stack(batch) if batch else np.zeros((0, 3, *config["input_size"][1:]), np.uint8)
    return out if input_type == "uint8" else out.astype(np.float32) / 255.0


@dataclass
class Exported:
    """An export that passed its check (or was forced): where it is, what was measured, and what
    was logged to the fit's MLflow run."""

    path: Path
    sidecar: Path
    record: dict
    logged: str


def export_bundle(bundle: Bundle, fmt: Format = "onnx", out: str | Path | None = None, *,
                  input_type: InputType = "uint8", check: str | Path | None = None, force: bool = False) -> Exported:
    """Export ``bundle``, check it against the bundle, and move it to ``out`` only when it agrees
    (top-1 on every image, probabilities within ``MAX_DIFFERENCE``) or ``force``. Default ``out``:
    ``<fit output>/export/model.onnx`` (``.pt`` for TorchScript); ``<out>.json`` beside it."""
    if fmt not in SUFFIX:
        raise TlpipeError(f"unknown export format '{fmt}': use onnx or torchscript")
    out = _output_file(Path(out) if out is not None else bundle.path.parent / "export" / f"model{SUFFIX[fmt]}")
    images, labels, source = check_images(bundle, check)
    module = ExportedClassifier(bundle, input_type).eval().cpu()
    example = torch.from_numpy(pixels(bundle, images[:2], input_type))
    meta = {"classes": bundle.classes, "preprocessing": preprocessing(bundle, input_type),
            "tlpipe_version": __version__, "bundle_sha256": bundle.manifest["head"]["sha256"]}
    sidecar = out.with_name(out.name + ".json")
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        exporter, parity = _export_checked(fmt, module, example, temporary, meta, (bundle, images, labels, input_type))
        if not parity["passed"] and not force:
            raise TlpipeError(f"export refused, nothing written: {parity['verdict']}; give other images with --check "
                              "or write it anyway with --force")
        record = {"format": fmt, "file": out.name, "sha256": _sha256(temporary), "bytes": temporary.stat().st_size,
                  **exporter, "torch_version": torch.__version__, **meta, "bundle": str(bundle.path.resolve()),
                  "parity": {**parity, "images_from": source, "forced": force and not parity["passed"]}}
        sidecar.unlink(missing_ok=True)  # killed between the two moves: a file without its sidecar, never a stale one
        os.replace(temporary, out)
    finally:
        temporary.unlink(missing_ok=True)
    atomic_write(sidecar, lambda f: f.write(json.dumps(record, ensure_ascii=False, indent=1)))
    return Exported(out, sidecar, record, _log_to_fit_run(bundle, record, sidecar))


def _output_file(out: Path) -> Path:
    """``out`` with its folder made, or one line on why it cannot be written there."""
    if out.is_dir():
        raise TlpipeError(f"--out {out} is a folder: give a file name, such as {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TlpipeError(f"cannot write {out} ({exc.strerror or exc}): choose another --out") from None
    if not os.access(out.parent, os.W_OK):
        raise TlpipeError(f"cannot write {out} (its folder is not writable): choose another --out")
    return out


def _log_to_fit_run(bundle: Bundle, record: dict, sidecar: Path) -> str:
    """The parity figures and the sidecar on the MLflow run of the fit that made the bundle, when
    its ``summary.json`` is beside it; what was done, as one line."""
    try:
        summary = read_json(bundle.path.parent / "summary.json")
        run_id, uri = summary["run_id"], summary["tracking_uri"]
    except (OSError, KeyError, ValueError):
        return "Not logged to MLflow: no summary.json of the fit beside the bundle"
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    fmt, now = record["format"], int(time.time() * 1000)
    figures = {f"export_{fmt}_batch{size}_{key}": row[key] for size, row in record["parity"]["batches"].items()
               for key in ("top1_agreement", "max_abs_difference")}
    try:
        client = MlflowClient(uri)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in figures.items()])
        client.log_artifact(run_id, str(sidecar), "export")
    except MlflowException as exc:
        return f"Not logged to MLflow run {run_id}: {exc.message.splitlines()[0][:160]}"
    return f"Logged to MLflow run {run_id} ({uri}): parity figures and export/{sidecar.name}"


def _export_checked(fmt: Format, module: nn.Module, example: torch.Tensor, path: Path, meta: dict,
                    check: tuple) -> tuple[dict, dict]:
    """Each exporter of ``fmt`` in turn until one writes a file that agrees with the bundle (ONNX:
    the dynamo exporter, then the TorchScript-based one); what ran, why the ones before it were
    dropped, and the parity of the file left at ``path``."""
    attempts = [("dynamo", True), ("torchscript", False)] if fmt == "onnx" else [("torch.jit.trace", None)]
    notes, result = [], None
    for name, dynamo in attempts:
        try:
            _write_onnx(module, example, path, meta, dynamo) if fmt == "onnx" else _write_torchscript(module, example, path, meta)
        except Exception as exc:  # noqa: BLE001 - any exporter failure: say it, try the next
            notes.append(f"the {name} exporter failed: {type(exc).__name__}: {(str(exc).strip() or '?').splitlines()[0][:200]}")
            continue
        result = name, check_parity(load_exported(path, fmt), *check)
        if result[1]["passed"]:
            break
        notes.append(f"the {name} exporter's graph was dropped: {result[1]['verdict']}")
    if result is None:
        raise TlpipeError(f"{fmt} export failed, nothing written ({'; '.join(notes)})"
                          + ("; try --format torchscript" if fmt == "onnx" else ""))
    return {"exporter": result[0], **({"opset": OPSET} if fmt == "onnx" else {}), "exporter_notes": notes}, result[1]


def _write_onnx(module: nn.Module, example: torch.Tensor, path: Path, meta: dict, dynamo: bool) -> None:
    """ONNX at opset ``OPSET`` with a dynamic batch axis, the metadata as JSON strings under their keys."""
    import warnings

    import onnx

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes fixed by the crop size
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
                                        output_names=[OUTPUT], dynamic_shapes={"images": {0: batch}}, verbose=False)
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                              output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    model = onnx.load(str(path))
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value, ensure_ascii=False))
    onnx.save(model, str(path))


def _write_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the tracer's notes on fixed shapes
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"tlpipe.json": json.dumps(meta, ensure_ascii=False)})


def load_exported(path: Path, fmt: Format) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the exported file as a deployment would: ONNX Runtime on CPU, or the
    TorchScript module loaded back on its own."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run([OUTPUT], {INPUT: batch})[0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()
    return run


def check_images(bundle: Bundle, check: str | Path | None) -> tuple[list[Path], list[int | None], str]:
    """Up to ``MAX_CHECK_IMAGES`` images with their class (None when unknown): those of ``check``
    (a class folder's name gives its images' class), else the fit's validation images."""
    if check is not None:
        images, _ = expand_image_paths([check])
        if not images:
            raise TlpipeError(f"--check {check}: no readable image files there; give a folder of images")
        labels = [bundle.classes.index(p.parent.name) if p.parent.name in bundle.classes else None for p in images]
        return *_spread(images, labels), str(check)
    fit = bundle.path.parent
    try:
        data = Path(read_json(fit / "summary.json")["data"])
        with (fit / "val_predictions.csv").open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, KeyError, ValueError):
        rows = []
    found = [(data / r["path"], r["true"]) for r in rows if (data / r["path"]).is_file()]
    if not found:
        raise TlpipeError(f"no validation images found for {bundle.path} (its fit's summary.json and val_predictions.csv, "
                          "or the data they name, are not there): give images with --check DIR")
    return *_spread([p for p, _ in found], [bundle.classes.index(c) if c in bundle.classes else None for _, c in found]), "validation"


def _spread(images: list[Path], labels: list) -> tuple[list[Path], list]:
    """At most ``MAX_CHECK_IMAGES``, evenly spread over the list (so over the classes too)."""
    if len(images) <= MAX_CHECK_IMAGES:
        return images, labels
    keep = np.linspace(0, len(images) - 1, MAX_CHECK_IMAGES).round().astype(int)
    return [images[i] for i in keep], [labels[i] for i in keep]


def check_parity(run: Callable[[np.ndarray], np.ndarray], bundle: Bundle, images: Sequence[Path],
                 labels: Sequence[int | None], input_type: InputType = "uint8") -> dict:
    """The exported model against the bundle on ``images`` at each of ``PARITY_BATCHES``: top-1
    agreement, the largest probability difference, and each one's accuracy where the class is known."""
    reference = bundle.predict_proba(list(images))
    batch = pixels(bundle, images, input_type)
    known = np.array([label is not None for label in labels])
    truth = np.array([label if label is not None else -1 for label in labels])
    rows = {}
    for size in PARITY_BATCHES:
        probabilities = np.concatenate([run(batch[i:i + size]) for i in range(0, len(batch), size)])
        rows[str(size)] = {
            "top1_agreement": float((probabilities.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_difference": float(np.abs(probabilities - reference).max()),
            "accuracy": float((probabilities.argmax(1) == truth)[known].mean()) if known.any() else None,
        }
    worst = min(rows.items(), key=lambda kv: (kv[1]["top1_agreement"], -kv[1]["max_abs_difference"]))
    passed = all(r["top1_agreement"] == 1.0 and r["max_abs_difference"] <= MAX_DIFFERENCE for r in rows.values())
    verdict = (f"at batch {worst[0]} the export agrees with the bundle on {worst[1]['top1_agreement']:.1%} of "
               f"{len(images)} images, probabilities within {worst[1]['max_abs_difference']:.1e} (needed: 100% and {MAX_DIFFERENCE:g})")
    return {"images": len(images), "batches": rows, "passed": passed, "verdict": verdict,
            "bundle_accuracy": float((reference.argmax(1) == truth)[known].mean()) if known.any() else None}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
