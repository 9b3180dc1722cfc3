"""The model bundle: everything prediction needs, without the training data and without pickle.

``<output>/model/`` holds ``bundle.json`` (backbone name, weight source and checksum, code tap,
preprocessing, classes, head kind, resolved config, metrics, tlpipe version) and
``head.safetensors``. Backbone weights are referenced by source and checksum when they are the
pretrained ones, and embedded as ``backbone.safetensors`` otherwise. Loading rebuilds the backbone
and refuses weights whose checksum differs from the one the head was trained on, and a head file
whose sha256 differs from the one recorded.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load as safetensors_load, save as safetensors_bytes

from tlpipe import __version__
from tlpipe.data import Sample, check_image, eval_loader
from tlpipe.data.scan import SPLIT_ALIASES, image_files
from tlpipe.device import resolve_device
from tlpipe.errors import TlpipeError
from tlpipe.models import Backbone, CodeExtractor, create_backbone, extract_codes, feature_state_dict, state_dict_sha256
from tlpipe.training import PROBABILITY_NOTES, LinearHead
from tlpipe.utils import atomic_write, read_json, write_json

BUNDLE_FORMAT = 2
MANIFEST, HEAD_FILE, BACKBONE_FILE = "bundle.json", "head.safetensors", "backbone.safetensors"


def save_bundle(
    path: Path, backbone: Backbone, head: LinearHead, classes: Sequence[str], *, layer: str, layer_relu: bool,
    config: dict, metrics: dict, trained: bool = False,
) -> Path:
    """Write the bundle to ``path`` (a folder); each file lands atomically. The backbone's weights
    are embedded when no source can give them back: ``trained`` (fine-tuned) or random init."""
    path.mkdir(parents=True, exist_ok=True)
    embed = trained or backbone.weights.kind == "none"
    if embed:
        state = {k: v.detach().cpu().contiguous() for k, v in feature_state_dict(backbone.model).items()}
        atomic_write(path / BACKBONE_FILE, lambda f: f.write(safetensors_bytes(state)), mode="wb")
    head_bytes = safetensors_bytes(head.tensors())
    atomic_write(path / HEAD_FILE, lambda f: f.write(head_bytes), mode="wb")
    write_json(path / MANIFEST, {
        "format": BUNDLE_FORMAT,
        "tlpipe_version": __version__,
        "backbone": {"name": backbone.name, "arch": backbone.arch, "weights": backbone.weights.to_dict(),
                     "embedded": embed, "sha256": state_dict_sha256(backbone.model)},
        "codes": {"layer": layer, "relu": layer_relu},
        "data_config": backbone.data_config,
        "classes": list(classes),
        "head": {"kind": head.kind, "probabilities": PROBABILITY_NOTES[head.kind],
                 "sha256": hashlib.sha256(head_bytes).hexdigest()},
        "config": config,
        "metrics": metrics,
    })
    return path


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
        self.extractor = CodeExtractor(backbone.model, codes["layer"], codes["relu"])

    def codes(self, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None) -> np.ndarray:
        samples = [Sample(Path(p), -1) for p in paths]
        loader = eval_loader(samples, self.backbone.data_config, batch_size, workers)
        return extract_codes(self.extractor, loader, self.device, "Predicting")[0]

    def predict_proba(self, paths: Sequence[Path], batch_size: int = 64, workers: int | None = None) -> np.ndarray:
        return self.head.predict_proba(self.codes(paths, batch_size, workers))

    def predict(self, paths: Sequence[Path], top_k: int = 1, batch_size: int = 64, workers: int | None = None) -> list[Prediction]:
        codes = self.codes(paths, batch_size, workers)
        probs = self.head.predict_proba(codes)
        # Rank by the logits: the class predicted is exactly the head's argmax, as in validation.
        order = np.argsort(-self.head.logits(codes), axis=1, kind="stable")[:, :top_k]
        return [
            Prediction(str(p), [self.classes[j] for j in row], [float(probs[i, j]) for j in row])
            for i, (p, row) in enumerate(zip(paths, order))
        ]


WHOLE_FOLDER = "all images"  # the split evaluate reports for a flat folder (no train/ val/ test/)


def _is_flat(root: Path) -> bool:
    """Class folders right under ``root``: ``scan_folder`` files them all as "train", but none of
    them was necessarily trained on, so the report must not call them that."""
    return not any(d.is_dir() and d.name.lower() in SPLIT_ALIASES for d in root.iterdir())


def evaluate_bundle(bundle: "Bundle", data: str | Path, split: str | None = None, batch_size: int = 64,
                    workers: int | None = None) -> dict:
    """Metrics of ``bundle`` on one split of a dataset folder: by default test/, else val/, else
    the whole of a flat class-per-folder (split ``WHOLE_FOLDER``). Classes are matched by name, so
    the folder may hold a subset of the bundle's classes; an unknown class is an error."""
    from tlpipe.data import prepare_dataset
    from tlpipe.metrics import classification_metrics

    spec = prepare_dataset(data, hold_out=False)
    if _is_flat(spec.root):
        if split is not None:
            raise TlpipeError(f"{spec.root} has no train/ val/ test/ folders: drop --split to score all of its images")
        spec.splits = {WHOLE_FOLDER: spec.splits["train"]}
    split = split or next(s for s in ("test", "val", "train", WHOLE_FOLDER) if s in spec.splits)
    if split not in spec.splits:
        raise TlpipeError(f"{spec.root} has no {split}/ split (found: {', '.join(spec.splits)}): use --split")
    unknown = sorted(set(spec.classes) - set(bundle.classes))
    if unknown:
        raise TlpipeError(f"{spec.root} has class folder(s) {', '.join(unknown)} that the bundle does not know")
    samples = spec.splits[split]
    to_bundle = [bundle.classes.index(name) for name in spec.classes]
    y_true = np.array([to_bundle[s.label] for s in samples])
    y_pred = bundle.head.predict(bundle.codes([s.path for s in samples], batch_size, workers))
    metrics = classification_metrics(y_true, y_pred, bundle.classes)
    return {"split": split, "data": str(spec.root), "n_images": len(samples), "quarantined": len(spec.quarantined), **metrics}


def load_bundle(path: str | Path, device: str = "auto") -> Bundle:
    """Load a bundle folder written by ``tlpipe fit`` (``<output>/model``). A bundle whose files
    differ from what its bundle.json records is refused: it would predict, but not as validated."""
    path = Path(path).expanduser()
    if (path / "model" / MANIFEST).is_file():
        path = path / "model"  # the fit's output dir was given
    manifest = _read_manifest(path)
    backbone = _load_backbone(path, manifest["backbone"])
    backbone.data_config = manifest["data_config"]
    head = LinearHead.from_tensors(_read_head(path, manifest["head"]), manifest["head"]["kind"])
    return Bundle(path, manifest, backbone, head, resolve_device(device))


def _read_manifest(path: Path) -> dict:
    if not (path / MANIFEST).is_file():
        raise TlpipeError(f"{path} is not a tlpipe model bundle (no {MANIFEST}): give the model/ folder a fit wrote")
    try:
        manifest = read_json(path / MANIFEST)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TlpipeError(f"{path / MANIFEST} is not valid JSON ({exc}): copy the bundle again or refit") from None
    manifest = manifest if isinstance(manifest, dict) else {}
    if manifest.get("format") != BUNDLE_FORMAT:
        raise TlpipeError(f"{path / MANIFEST} has bundle format {manifest.get('format')} (written by tlpipe "
                          f"{manifest.get('tlpipe_version', '?')}); this tlpipe {__version__} reads format {BUNDLE_FORMAT}: "
                          "use the tlpipe version that wrote it, or refit with this one")
    return manifest


def _load_backbone(path: Path, spec: dict) -> Backbone:
    """The backbone the head was trained on, checked against the checksum the bundle records."""
    weights = path / BACKBONE_FILE if spec["embedded"] else (
        spec["weights"]["location"] if spec["weights"]["kind"] == "file" else "auto"
    )
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


def _read_head(path: Path, spec: dict) -> dict[str, torch.Tensor]:
    """The head's tensors, its file checked against the checksum bundle.json records (bundles saved
    before the checksum was recorded have none: still read, as before)."""
    file = path / HEAD_FILE
    if not file.is_file():
        raise TlpipeError(f"{file} is missing: copy the whole bundle folder again or refit")
    data = file.read_bytes()
    if "sha256" in spec and hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise TlpipeError(f"{file} does not match the checksum {MANIFEST} records: the bundle was altered or "
                          "damaged; copy it again or refit")
    try:
        return safetensors_load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same damaged file
        raise TlpipeError(f"{file} is not a readable safetensors file ({exc}): copy the bundle again or refit") from None


def expand_image_paths(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files and folders (searched recursively) → (usable image paths, [(path, why not)])."""
    images, problems = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            found = image_files(item)
            if not found:
                problems.append((item, "folder holds no image files"))
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            problems.append((item, "no such file or folder"))
    good = []
    for path in images:
        reason = check_image(path)
        if reason:
            problems.append((path, reason))
        else:
            good.append(path)
    return good, problems
