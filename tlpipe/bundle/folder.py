"""The model bundle: everything prediction needs, without the training data and without pickle.

``<output>/model/`` holds ``bundle.json`` (backbone name, weight source and checksum, code tap,
preprocessing, classes, head kind, resolved config, metrics, tlpipe version) and
``head.safetensors``. Backbone weights are referenced by source and checksum when they are the
pretrained ones, and embedded as ``backbone.safetensors`` otherwise (a ``--weights`` file too: a
bundle never points outside itself). Loading rebuilds the backbone and refuses weights whose
checksum differs from the one the head was trained on, and a head file whose sha256 differs from
the one recorded.
"""
from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from safetensors import safe_open
from safetensors.torch import load as safetensors_load, save as safetensors_bytes

from PIL import Image
from torch.utils.data import DataLoader

from tlpipe.data import Sample, eval_loader, eval_transform
from tlpipe.device import resolve_device
from tlpipe.errors import TlpipeError
from tlpipe.paths import BUNDLE_HEAD, BUNDLE_MANIFEST, inside
from tlpipe.models import Backbone, CodeExtractor, create_backbone, extract_codes, feature_state_dict, state_dict_sha256
from tlpipe.training import PROBABILITY_NOTES, LinearHead
from tlpipe.utils import atomic_write, read_json, write_json
from tlpipe.version import __version__

BUNDLE_FORMAT = 2
MULTILABEL_PROBABILITIES = ("a sigmoid per class of the head's score (one-vs-rest logistic regression, or the fine-tuned "
                            "network's logit) over that class's temperature (fitted on val); the class is predicted at or "
                            "over its threshold (F1-optimal on val)")
MANIFEST, HEAD_FILE, BACKBONE_FILE = BUNDLE_MANIFEST, BUNDLE_HEAD, "backbone.safetensors"


def save_bundle(
    path: Path, backbone: Backbone, head: LinearHead, classes: Sequence[str], *, layer: str, layer_relu: bool,
    config: dict, metrics: dict, trained: bool = False, hflip: bool = False,
) -> Path:
    """Write the bundle to ``path`` (a folder); each file lands atomically. The backbone's weights
    are embedded when no source can give them back: ``trained`` (fine-tuned) or random init, and
    when they came from the user's file (which may move, or be edited), converted to safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    weights = backbone.weights.to_dict()
    embed = trained or weights["kind"] in ("none", "file")
    if weights["kind"] == "file":  # the copy in the bundle is the source: no path of the user's machine
        weights["location"] = BACKBONE_FILE
    if embed:
        _write_backbone(path, backbone.model)
    head_bytes = safetensors_bytes(head.tensors())
    atomic_write(path / HEAD_FILE, lambda f: f.write(head_bytes), mode="wb")
    write_json(path / MANIFEST, {
        "format": BUNDLE_FORMAT,
        "tlpipe_version": __version__,
        "backbone": {"name": backbone.name, "arch": backbone.arch, "weights": weights,
                     "embedded": embed, "sha256": state_dict_sha256(backbone.model)},
        "codes": {"layer": layer, "relu": layer_relu, "hflip": hflip},
        "data_config": backbone.data_config,
        "classes": list(classes),
        "head": {"kind": head.kind, "sha256": hashlib.sha256(head_bytes).hexdigest(), **_head_notes(head, classes)},
        "config": config,
        "metrics": metrics,
    })
    return path


def _head_notes(head: LinearHead, classes: Sequence[str]) -> dict:
    """What a reader of bundle.json learns of the head's probabilities (head.safetensors holds the values)."""
    if not head.multilabel:
        return {"task": "multiclass", "probabilities": PROBABILITY_NOTES[head.kind], "temperature": round(1 / head.scale, 6)}
    return {"task": "multilabel", "probabilities": MULTILABEL_PROBABILITIES,
            "temperatures": dict(zip(classes, (round(1 / float(s), 6) for s in head.scale))),
            "thresholds": dict(zip(classes, (round(float(t), 6) for t in head.thresholds)))}


def _write_backbone(path: Path, model: torch.nn.Module) -> None:
    """The backbone's weights (feature extractor only) as ``backbone.safetensors`` in ``path``."""
    state = {k: v.detach().cpu().contiguous() for k, v in feature_state_dict(model).items()}
    atomic_write(path / BACKBONE_FILE, lambda f: f.write(safetensors_bytes(state)), mode="wb")


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # strict: "2" is not 2, "true" is not true


class _Weights(_Part):
    kind: Literal["file", "package", "timm-cache", "timm-hub", "none"]
    location: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _BackboneEntry(_Part):
    name: str = Field(min_length=1)
    arch: str = Field(min_length=1)
    weights: _Weights
    embedded: bool
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _Codes(_Part):
    layer: str = Field(min_length=1)
    relu: bool
    hflip: bool = False  # test-time flip averaging, chosen on val


class _DataConfig(_Part):
    model_config = ConfigDict(extra="allow", strict=False)  # JSON has no tuples: lists stand for them
    input_size: tuple[Literal[3], StrictInt, StrictInt]
    interpolation: Literal["bilinear", "bicubic", "nearest"]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = Field(gt=0, le=1)
    crop_mode: Literal["center", "squash", "border"] = "center"

    @field_validator("input_size")
    @classmethod
    def _side(cls, size):
        if not all(16 <= side <= 4096 for side in size[1:]):
            raise ValueError(f"image sides {size[1:]} outside 16..4096")
        return size

    @field_validator("std")
    @classmethod
    def _positive(cls, std):
        if not all(math.isfinite(v) and v > 0 for v in std):
            raise ValueError("every std must be a positive number")
        return std


class _HeadEntry(_Part):
    kind: Literal["logreg", "svm", "finetune"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    task: Literal["multiclass", "multilabel"] = "multiclass"


class Manifest(_Part):
    """``bundle.json``, checked field by field before anything is built from it."""

    format: int
    tlpipe_version: str
    backbone: _BackboneEntry
    codes: _Codes
    data_config: _DataConfig
    classes: list[str] = Field(min_length=2)
    head: _HeadEntry
    config: dict
    metrics: dict

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes):
        if len(set(classes)) != len(classes) or not all(classes):
            raise ValueError("class names must be distinct and non-empty")
        return classes


def invalid(path: Path, what: str) -> TlpipeError:
    return TlpipeError(f"{path} is not a valid tlpipe bundle: {what}; refit or restore it")


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]


class Bundle:
    """A loaded bundle: ``predict(paths)`` gives top-k labels with probabilities."""

    def __init__(self, path: Path, manifest: dict, backbone: Backbone, head: LinearHead, device: torch.device):
        self.path, self.manifest, self.backbone, self.head, self.device = path, manifest, backbone, head, device
        self.classes: list[str] = manifest["classes"]
        codes = manifest["codes"]
        self.extractor = CodeExtractor(backbone.model, codes["layer"], codes["relu"], codes.get("hflip", False))

    def codes(self, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None,
              onnx_runtime: bool = True) -> np.ndarray:
        """``onnx_runtime=False``: PyTorch even where ONNX Runtime would run the pass (a reference)."""
        samples = [Sample(Path(p), -1) for p in paths]
        loader = eval_loader(samples, self.backbone.data_config, batch_size, workers)
        return extract_codes(self.extractor, loader, self.device, "Predicting", onnx_runtime=onnx_runtime)[0]

    def predict_proba(self, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None,
                      onnx_runtime: bool = True) -> np.ndarray:
        return self.head.predict_proba(self.codes(paths, batch_size, workers, onnx_runtime))

    def image_codes(self, pictures: Sequence[Image.Image], batch_size: int = 64) -> np.ndarray:
        """``codes`` of images already decoded (``load_rgb``), as a server receives them."""
        transform = eval_transform(self.backbone.data_config)
        loader = DataLoader([(transform(p), -1) for p in pictures], batch_size=batch_size)
        return extract_codes(self.extractor, loader, self.device, "Predicting")[0]

    def ranked(self, codes: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """The probabilities of ``codes`` and each row's ``top_k`` classes, best first, ties to the lower
        index: what ``predict`` and the MLflow model answer. Ranked by the logits, not the probabilities,
        so the first is exactly the head's argmax (what validation scored) even where probabilities
        round to the same float."""
        logits = self.head.logits(codes)
        return self.head.proba_from_logits(logits), np.argsort(-logits, axis=1, kind="stable")[:, :top_k]

    def label_sets(self, probabilities: np.ndarray) -> list[list[int]]:
        """A multi-label head's answer for each row: the classes at or over their thresholds, most probable first."""
        order = np.argsort(-probabilities, axis=1, kind="stable")
        return [[int(j) for j in row if p[j] >= self.head.thresholds[j]] for p, row in zip(probabilities, order)]

    def predict(self, paths: Sequence[Path], top_k: int = 1, batch_size: int = 64, workers: int | None = None) -> list[Prediction]:
        """Each image's ``top_k`` classes, best first; multi-label: its set of classes (``label_sets``,
        possibly none), ``top_k`` aside."""
        codes = self.codes(paths, batch_size, workers)
        if self.head.multilabel:
            probs = self.head.predict_proba(codes)
            order = self.label_sets(probs)
        else:
            probs, order = self.ranked(codes, top_k)
        return [
            Prediction(str(p), [self.classes[j] for j in row], [float(probs[i, j]) for j in row])
            for i, (p, row) in enumerate(zip(paths, order))
        ]


def load_bundle(path: str | Path, device: str = "auto") -> Bundle:
    """Load a bundle folder written by ``tlpipe fit`` (``<output>/model``). A bundle whose files
    differ from what its bundle.json records is refused: it would predict, but not as validated."""
    path = Path(path).expanduser()
    if (path / "model" / MANIFEST).is_file():
        path = path / "model"  # the fit's output dir was given
    manifest = _read_manifest(path)
    backbone = _load_backbone(path, manifest["backbone"])
    backbone.data_config = manifest["data_config"]
    head = LinearHead.from_tensors(_read_head(path, manifest["head"], len(manifest["classes"])), manifest["head"]["kind"])
    bundle = Bundle(path, manifest, backbone, head, resolve_device(device))
    _check_code_width(bundle)
    return bundle


def portable_bundle(source: Path, target: Path) -> Path:
    """A copy of the bundle at ``source`` that needs nothing outside it but pip packages: the
    backbone's weights are embedded unless a pinned pip package gives them back."""
    target.mkdir(parents=True)
    for name in (MANIFEST, HEAD_FILE, BACKBONE_FILE):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    manifest = read_json(target / MANIFEST)
    if manifest["backbone"]["embedded"] or manifest["backbone"]["weights"]["kind"] == "package":
        return target
    _write_backbone(target, load_bundle(source).backbone.model)
    write_json(target / MANIFEST, {**manifest, "backbone": {**manifest["backbone"], "embedded": True}})
    return target


def _check_code_width(bundle: Bundle) -> None:
    """The head's input width against the width of the codes the backbone gives at its tap."""
    size = bundle.backbone.data_config["input_size"]
    with torch.no_grad():
        width = bundle.extractor(torch.zeros(1, *size)).shape[1]
    if bundle.head.weight.shape[1] != width:
        raise invalid(bundle.path, f"{HEAD_FILE} takes codes of {bundle.head.weight.shape[1]} values, "
                                   f"{bundle.manifest['backbone']['name']} at {bundle.manifest['codes']['layer']} gives {width}")


def _read_manifest(path: Path) -> dict:
    if not (path / MANIFEST).is_file():
        raise TlpipeError(f"{path} is not a tlpipe model bundle (no {MANIFEST}): give the model/ folder a fit wrote")
    try:
        manifest = read_json(path / MANIFEST)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TlpipeError(f"{path / MANIFEST} is not valid JSON ({str(exc).splitlines()[0][:120]}): copy the bundle again or refit") from None
    if not isinstance(manifest, dict):
        raise invalid(path, f"{MANIFEST} holds a JSON {type(manifest).__name__}, not an object")
    found = manifest.get("format")
    if isinstance(found, int) and not isinstance(found, bool) and found != BUNDLE_FORMAT:
        raise TlpipeError(f"{path / MANIFEST} has bundle format {found} (written by tlpipe "
                          f"{manifest.get('tlpipe_version', '?')}); this tlpipe {__version__} reads format {BUNDLE_FORMAT}: "
                          "use the tlpipe version that wrote it, or refit with this one")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "bundle.json"
        raise invalid(path, f"{MANIFEST} {where}: {first['msg']}") from None
    return manifest


def _load_backbone(path: Path, spec: dict) -> Backbone:
    """The backbone the head was trained on, checked against the checksum the bundle records."""
    weights = _embedded_weights(path) if spec["embedded"] else (
        _weights_inside(path, spec["weights"]["location"]) if spec["weights"]["kind"] == "file" else "auto")
    backbone = create_backbone(spec["name"], weights=weights)
    expected, found = spec["sha256"], backbone.weights.sha256
    if found != expected and spec["embedded"]:
        raise TlpipeError(f"{path / BACKBONE_FILE} holds weights with checksum {found[:12]}…, not the {expected[:12]}… "
                          f"{MANIFEST} records: the bundle was altered or damaged; copy it again or refit")
    if found != expected:
        raise TlpipeError(
            f"{path / MANIFEST} records {spec['name']} weights with checksum {expected[:12]}…, but the weights found "
            f"now ({backbone.weights.kind}: {backbone.weights.location}) have {found[:12]}…: install the same weights or refit"
        )
    return backbone


def _embedded_weights(path: Path) -> Path:
    """``backbone.safetensors``, its header and length checked before the model is built from it,
    so that a missing or damaged copy is named as the bundle's own file."""
    file = path / BACKBONE_FILE
    try:
        with safe_open(str(file), "pt"):
            pass
    except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: the same damaged bundle
        what = "is damaged (not a readable safetensors file)" if file.is_file() else "is missing"
        raise TlpipeError(f"{file} {what}: the bundle's backbone weights cannot be loaded; copy the whole "
                          "bundle folder again, or refit") from None
    return file


def _weights_inside(path: Path, location: str) -> Path:
    """The weights file ``location`` names, only inside the bundle folder: a bundle carries its
    weights, and a crafted bundle.json must not make tlpipe read a file anywhere else."""
    file = inside(path, location)
    if file is None:
        raise TlpipeError(f"{path / MANIFEST} names backbone weights outside the bundle folder ({location!r}): a bundle "
                          "must carry its weights; refit with this tlpipe, which copies them in")
    return file


def _read_head(path: Path, spec: dict, n_classes: int) -> dict[str, torch.Tensor]:
    """The head's tensors, its file checked against the checksum bundle.json records, their shapes
    against the classes."""
    file = path / HEAD_FILE
    if not file.is_file():
        raise TlpipeError(f"{file} is missing: copy the whole bundle folder again or refit")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise TlpipeError(f"{file} does not match the checksum {MANIFEST} records: the bundle was altered or "
                          "damaged; copy it again or refit")
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same damaged file
        raise TlpipeError(f"{file} is not a readable safetensors file ({exc}): copy the bundle again or refit") from None
    multilabel = spec.get("task") == "multilabel"  # a scale and a threshold per class
    expected = {"weight": (n_classes, None), "bias": (n_classes,), "scale": (n_classes if multilabel else 1,),
                **({"thresholds": (n_classes,)} if multilabel else {})}
    for name, shape in expected.items():
        if name not in tensors:
            raise invalid(path, f"{HEAD_FILE} has no '{name}' tensor")
        found = tuple(tensors[name].shape)
        if len(found) != len(shape) or any(e not in (None, f) for e, f in zip(shape, found)):
            raise invalid(path, f"{HEAD_FILE} '{name}' has shape {found}, where {n_classes} classes need "
                                f"{tuple('any' if e is None else e for e in shape)}")
    if not (torch.isfinite(tensors["weight"]).all() and torch.isfinite(tensors["bias"]).all() and (tensors["scale"] > 0).all()):
        raise invalid(path, f"{HEAD_FILE} holds values that are not finite, or a temperature that is not positive")
    if multilabel and not ((tensors["thresholds"] >= 0) & (tensors["thresholds"] <= 1)).all():
        raise invalid(path, f"{HEAD_FILE} holds a threshold outside 0..1")
    if not multilabel:
        tensors.pop("thresholds", None)  # task says multiclass: a stray tensor does not make it multi-label
    return tensors
