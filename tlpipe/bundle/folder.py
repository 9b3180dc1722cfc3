"""The model bundle: everything prediction needs, without the training data and without pickle.

``<output>/model/`` holds ``bundle.json`` (backbone name, weight source and checksum, code tap,
preprocessing, classes, head kind, resolved config, metrics, tlpipe version) and
``head.safetensors`` (and ``unknown.safetensors``, the unknown-image detector; ``fit_images.safetensors``,
the content hashes of the train and val images, so ``evaluate`` can tell images the fit saw). Backbone weights are referenced by source and checksum when they are the
pretrained ones, and embedded as ``backbone.safetensors`` otherwise (a ``--weights`` file too: a
bundle never points outside itself). Loading rebuilds the backbone and refuses weights whose
checksum differs from the one the head was trained on, and a head file whose sha256 differs from
the one recorded.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from PIL import Image
from torch.utils.data import DataLoader

from tlpipe.bundle.manifest import (
    BUNDLE_FORMAT, FIT_IMAGES_FILE, HEAD_FILE, MANIFEST, UNKNOWN_FILE, bundle_manifest, invalid, read_fit_images,
    read_head, read_unknowns,
)
from tlpipe.data import Sample, eval_loader, eval_transform
from tlpipe.device import resolve_device
from tlpipe.errors import TlpipeError
from tlpipe.bundle.unknowns import UnknownDetector, unknowns_from_tensors
from tlpipe.paths import inside
from tlpipe.models import Backbone, CodeExtractor, create_backbone, extract_codes, feature_state_dict, state_dict_sha256
from tlpipe.training.head import PROBABILITY_NOTES, LinearHead
from tlpipe.utils import atomic_write, read_json, write_json
from tlpipe.version import __version__

MULTILABEL_PROBABILITIES = ("a sigmoid per class of the head's score (one-vs-rest logistic regression, or the fine-tuned "
                            "network's logit) over that class's temperature (fitted on val); the class is predicted at or "
                            "over its threshold (F1-optimal on val)")
BACKBONE_FILE = "backbone.safetensors"


def save_bundle(
    path: Path, backbone: Backbone, head: LinearHead, classes: Sequence[str], *, layer: str, layer_relu: bool,
    config: dict, metrics: dict, trained: bool = False, hflip: bool = False, unknowns: UnknownDetector | None = None,
    fit_images: dict[str, Sequence[str]] | None = None,
) -> Path:
    """Write the bundle to ``path`` (a folder); each file lands atomically. The backbone's weights
    are embedded when no source can give them back: ``trained`` (fine-tuned) or random init, and
    when they came from the user's file (which may move, or be edited), converted to safetensors.
    ``fit_images``: the hex content hashes (``content_hashes``) of the train and val images."""
    path.mkdir(parents=True, exist_ok=True)
    weights = backbone.weights.to_dict()
    embed = trained or weights["kind"] in ("none", "file")
    if weights["kind"] == "file":  # the copy in the bundle is the source: no path of the user's machine
        weights["location"] = BACKBONE_FILE
    if embed:
        _write_backbone(path, backbone.model)
    head_bytes = safetensors_bytes(head.tensors())
    atomic_write(path / HEAD_FILE, lambda f: f.write(head_bytes), mode="wb")
    unknown_entry = None
    if unknowns is not None:
        unknown_bytes = safetensors_bytes(unknowns.tensors())
        atomic_write(path / UNKNOWN_FILE, lambda f: f.write(unknown_bytes), mode="wb")
        unknown_entry = {"sha256": hashlib.sha256(unknown_bytes).hexdigest(), **unknowns.to_dict()}
    else:
        (path / UNKNOWN_FILE).unlink(missing_ok=True)
    images_entry = fit_images and _write_fit_images(path, fit_images)
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
        **({"unknown": unknown_entry} if unknown_entry else {}),
        **({"fit_images": images_entry} if images_entry else {}),
    })
    return path


def _write_fit_images(path: Path, fit_images: dict[str, Sequence[str]]) -> dict:
    """``fit_images.safetensors``: a 16-byte row per image and split; its bundle.json entry."""
    rows = {split: torch.from_numpy(np.frombuffer(b"".join(map(bytes.fromhex, hashes)), np.uint8).reshape(-1, 16).copy())
            for split, hashes in fit_images.items()}
    data = safetensors_bytes(rows)
    atomic_write(path / FIT_IMAGES_FILE, lambda f: f.write(data), mode="wb")
    return {"sha256": hashlib.sha256(data).hexdigest(), "digest": "blake2b-128"}


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


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probabilities: list[float]
    unknown: bool = False  # of no class the model knows (its labels are then only what it would have said)
    unknown_score: float | None = None  # None: the bundle has no unknown rejection


class Bundle:
    """A loaded bundle: ``predict(paths)`` gives top-k labels with probabilities."""

    def __init__(self, path: Path, manifest: dict, backbone: Backbone, head: LinearHead, device: torch.device,
                 unknowns: UnknownDetector | None = None):
        self.path, self.manifest, self.backbone, self.head, self.device = path, manifest, backbone, head, device
        self.unknowns = unknowns  # None: the bundle answers a class for every image
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

    def fit_images(self) -> dict[str, set[bytes]] | None:
        """The digests of the images the fit trained on and selected with, by split (``content_hashes``,
        as bytes); None for a bundle that records none."""
        entry = self.manifest.get("fit_images")
        return entry and read_fit_images(self.path, entry)

    def unknown_scores(self, codes: np.ndarray, reject: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """Each row's unknown score and whether it is over the threshold; None without a detector.
        ``reject=False``: the scores, nothing flagged."""
        if self.unknowns is None:
            return None
        scores = self.unknowns.score(codes)
        return scores, self.unknowns.unknown(scores) & reject

    def predict(self, paths: Sequence[Path], top_k: int = 1, batch_size: int = 64, workers: int | None = None,
                reject: bool = True) -> list[Prediction]:
        """Each image's ``top_k`` classes, best first; multi-label: its set of classes (``label_sets``,
        possibly none), ``top_k`` aside. An image of no known class is flagged ``unknown`` (with
        ``reject``, and when the bundle has an unknown detector)."""
        codes = self.codes(paths, batch_size, workers)
        scored = self.unknown_scores(codes, reject)
        if self.head.multilabel:
            probs = self.head.predict_proba(codes)
            order = self.label_sets(probs)
        else:
            probs, order = self.ranked(codes, top_k)
        return [
            Prediction(str(p), [self.classes[j] for j in row], [float(probs[i, j]) for j in row],
                       *((bool(scored[1][i]), float(scored[0][i])) if scored else ()))
            for i, (p, row) in enumerate(zip(paths, order))
        ]


def load_bundle(path: str | Path, device: str = "auto") -> Bundle:
    """Load a bundle folder written by ``tlpipe fit`` (``<output>/model``). A bundle whose files
    differ from what its bundle.json records is refused: it would predict, but not as validated."""
    path, manifest = bundle_manifest(path)
    backbone = _load_backbone(path, manifest["backbone"])
    backbone.data_config = manifest["data_config"]
    head = LinearHead.from_tensors(read_head(path, manifest["head"], len(manifest["classes"])), manifest["head"]["kind"])
    bundle = Bundle(path, manifest, backbone, head, resolve_device(device))
    _check_code_width(bundle)
    if entry := manifest.get("unknown"):  # checked against the codes' width, known good by now
        tensors = read_unknowns(path, entry, head.weight.shape[1])
        bundle.unknowns = unknowns_from_tensors(tensors, entry["threshold"], entry["false_rejection"])
    return bundle


def portable_bundle(source: Path, target: Path) -> Path:
    """A copy of the bundle at ``source`` that needs nothing outside it but pip packages: the
    backbone's weights are embedded unless a pinned pip package gives them back."""
    target.mkdir(parents=True)
    for name in (MANIFEST, HEAD_FILE, UNKNOWN_FILE, FIT_IMAGES_FILE, BACKBONE_FILE):
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
