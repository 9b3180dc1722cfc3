"""What a bundle folder must hold before anything is built from it: ``bundle.json`` checked field by
field (``Manifest``), ``head.safetensors`` and ``unknown.safetensors`` checked against the checksums
and shapes it records. A bundle that fails is refused in one line that names the file.
``bundle_manifest`` needs no torch: a command checks the bundle it was given before the heavy imports."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from tlpipe.errors import TlpipeError
from tlpipe.paths import BUNDLE_HEAD, BUNDLE_MANIFEST
from tlpipe.utils import read_json
from tlpipe.version import __version__

if TYPE_CHECKING:  # torch loads with the tensors: checking bundle.json alone is instant
    import torch

BUNDLE_FORMAT = 2
MANIFEST, HEAD_FILE, UNKNOWN_FILE = BUNDLE_MANIFEST, BUNDLE_HEAD, "unknown.safetensors"
FIT_IMAGES_FILE = "fit_images.safetensors"  # the content hashes of the images the fit trained and selected on
FIT_IMAGE_SPLITS = ("train", "val")


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


class _UnknownEntry(_Part):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    threshold: float = Field(gt=0, allow_inf_nan=False)
    false_rejection: float = Field(gt=0, lt=1)


class _FitImagesEntry(_Part):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    digest: Literal["blake2b-128"]


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
    unknown: _UnknownEntry | None = None  # bundles without unknown rejection have none
    fit_images: _FitImagesEntry | None = None  # earlier bundles record no fit images: evaluate cannot check overlap

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes):
        if len(set(classes)) != len(classes) or not all(classes):
            raise ValueError("class names must be distinct and non-empty")
        return classes


def invalid(path: Path, what: str) -> TlpipeError:
    return TlpipeError(f"{path} is not a valid tlpipe bundle: {what}; refit or restore it")


def bundle_manifest(path: str | Path) -> tuple[Path, dict]:
    """The bundle folder ``path`` names (a fit's output folder stands for its ``model/``) and its
    checked ``bundle.json``."""
    path = Path(path).expanduser()
    if (path / "model" / MANIFEST).is_file():
        path = path / "model"  # the fit's output dir was given
    return path, read_manifest(path)


def read_manifest(path: Path) -> dict:
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


def _checked_tensors(file: Path, sha256: str) -> dict[str, torch.Tensor]:
    """The tensors of a bundle's safetensors ``file``, once its bytes match the checksum bundle.json records."""
    from safetensors.torch import load as safetensors_load

    if not file.is_file():
        raise TlpipeError(f"{file} is missing: copy the whole bundle folder again or refit")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise TlpipeError(f"{file} does not match the checksum {MANIFEST} records: the bundle was altered or "
                          "damaged; copy it again or refit")
    try:
        return safetensors_load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same damaged file
        raise TlpipeError(f"{file} is not a readable safetensors file ({exc}): copy the bundle again or refit") from None


def read_head(path: Path, spec: dict, n_classes: int) -> dict[str, torch.Tensor]:
    """The head's tensors, its file checked against the checksum bundle.json records, their shapes
    against the classes."""
    import torch

    tensors = _checked_tensors(path / HEAD_FILE, spec["sha256"])
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


def read_unknowns(path: Path, spec: dict, width: int) -> dict[str, torch.Tensor]:
    """The unknown detector's tensors, checked against the checksum bundle.json records and against
    the codes' ``width``: a (width, width) projection and (classes, width) centres, all finite."""
    import torch

    tensors = _checked_tensors(path / UNKNOWN_FILE, spec["sha256"])
    projection, centres = tensors.get("projection"), tensors.get("centres")
    if projection is None or centres is None or tuple(projection.shape) != (width, width) or centres.ndim != 2 \
            or centres.shape[1] != width or not (torch.isfinite(projection).all() and torch.isfinite(centres).all()):
        raise invalid(path, f"{UNKNOWN_FILE} needs finite 'projection' ({width}, {width}) and 'centres' (classes, {width}) "
                            "tensors for codes of this width")
    return tensors


def read_fit_images(path: Path, spec: dict) -> dict[str, set[bytes]]:
    """The digests of the images the fit trained on (train) and selected with (val), checked against
    the checksum bundle.json records: one 16-byte row per image."""
    import torch

    tensors = _checked_tensors(path / FIT_IMAGES_FILE, spec["sha256"])
    for split in FIT_IMAGE_SPLITS:
        rows = tensors.get(split)
        if rows is None or rows.dtype != torch.uint8 or rows.ndim != 2 or rows.shape[1] != 16:
            raise invalid(path, f"{FIT_IMAGES_FILE} needs a uint8 '{split}' tensor of 16-byte rows")
    return {split: {bytes(row) for row in tensors[split].numpy()} for split in FIT_IMAGE_SPLITS}
