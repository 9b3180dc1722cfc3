"""CNN codes: what a frozen backbone says about each image, as one vector per image.

The default tap is the penultimate layer exactly as the network ends (``forward_head`` with
``pre_logits=True``: after the final activation, so non-negative for ReLU nets). An earlier tap
is any entry of timm's ``feature_info`` (by index or module name), ReLU'd and global-average pooled;
taps joined by "+" give their codes side by side (``"penultimate+blocks.4"``).
"""
from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from tlpipe.cache import cache_key, load_cached, save_cached
from tlpipe.config import FitConfig
from tlpipe.data import DatasetSpec, eval_loader
from tlpipe.device import resolve_device
from tlpipe.errors import TlpipeError
from tlpipe.models.backbones import Backbone
from tlpipe.models.hooks import Hooks
from tlpipe.models.runtime import ORT_MIN_IMAGES, onnx_pass
from tlpipe.progress import progress_bar

if TYPE_CHECKING:
    from tlpipe.training.distributed import DistContext

PENULTIMATE = "penultimate"
# Images a cache entry of a split's codes holds: a pass is written to the cache chunk by chunk as it
# goes, so a pass killed at image 60,000 resumes at the last whole chunk instead of image 0.
CODES_CHUNK = 16_384


def feature_layers(model: nn.Module) -> list[str]:
    """Module names of the taps timm declares for ``model``, earliest first."""
    return [info["module"] for info in getattr(model, "feature_info", [])]


def resolve_layer(model: nn.Module, layer: str | int | None) -> str:
    """Turn ``layer`` (None/"penultimate", an index into ``feature_info``, or a module name; or several
    joined by "+", whose codes are concatenated) into module names joined by "+", or ``PENULTIMATE``."""
    if isinstance(layer, str) and "+" in layer:
        return "+".join(dict.fromkeys(resolve_layer(model, part.strip()) for part in layer.split("+")))
    if layer is None or layer == PENULTIMATE:
        return PENULTIMATE
    names = feature_layers(model)
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if isinstance(layer, int):
        if -len(names) <= layer < len(names):
            return names[layer]
    elif layer in names or layer in dict(model.named_modules()):
        return layer
    choices = ", ".join(f"{i}={n}" for i, n in enumerate(names))
    raise TlpipeError(f"unknown layer '{layer}' for this backbone: use '{PENULTIMATE}' or one of {choices} "
                      f"(several joined by '+' concatenate their codes)")


def pool_tap(tapped: torch.Tensor, relu: bool) -> torch.Tensor:
    """An earlier stage's feature map as a code: ReLU'd (when asked) and global-average pooled."""
    return F.adaptive_avg_pool2d(F.relu(tapped) if relu else tapped, 1).flatten(1)


class CodeExtractor(nn.Module):
    """Wraps a backbone so that ``forward(images)`` returns pooled codes from one tap, or from several
    (``"penultimate+blocks.4"``) side by side, in the order given, from the same pass. With
    ``hflip``, each code is the mean of the image's and its mirror's: for a linear head, exactly the
    mean of the two views' logits (test-time flip averaging). Its hooks stay on ``model`` until
    ``close()`` (or the end of a ``with`` block): an extractor on a shared backbone is closed when done."""

    def __init__(self, model: nn.Module, layer: str | int | None = None, relu: bool = True, hflip: bool = False):
        super().__init__()
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.relu, self.hflip = relu, hflip
        self._captured: dict[str, torch.Tensor] = {}
        self.hooks = Hooks()
        for name in self.layer.split("+"):
            if name != PENULTIMATE:
                self.hooks.after(model.get_submodule(name), partial(self._capture, name))

    def close(self) -> None:
        """Take the hooks off the model: it no longer feeds this extractor, nor keeps it alive."""
        self.hooks.close()

    def __enter__(self) -> "CodeExtractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _capture(self, name: str, module, inputs, output) -> None:
        self._captured[name] = output

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.hflip:
            return self._codes(images)
        # Two passes, not one of twice the batch: slicing a doubled batch makes the ONNX exporter
        # fix the batch size (seen with torch 2.14's dynamo exporter).
        return (self._codes(images) + self._codes(images.flip(-1))) / 2

    def _codes(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        parts = []
        for name in self.layer.split("+"):
            if name == PENULTIMATE:
                parts.append(self.model.forward_head(features, pre_logits=True))
                continue
            parts.append(pool_tap(self._captured.pop(name), self.relu))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def extract_codes(extractor: nn.Module, loader: DataLoader, device: torch.device, description: str = "Extracting",
                  torch_first: int = 0, pytorch_time: dict | None = None, onnx_runtime: bool = True,
                  rows: np.ndarray | None = None, deadline: float | None = None, at_least: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Run ``extractor`` over ``loader``; return float32 codes and int64 labels (in the loader's order unless ``rows``). On a CPU,
    a pass of at least ``ORT_MIN_IMAGES`` goes through ONNX Runtime (after ``torch_first`` images:
    hooks that keep Python state, such as BatchNorm moments, need PyTorch itself; ``onnx_runtime=False``:
    PyTorch throughout). ``pytorch_time`` gets the ``seconds`` and ``images`` of the batches PyTorch ran (loading included).
    ``rows``: the row of the result each image (in the loader's order) goes to, a permutation. Each batch is
    written into one array as it comes: a pass holds the codes once, not a list of batches and their join.
    ``deadline`` (``time.monotonic()``): the pass stops at the first batch past it, once ``at_least`` images are
    done, and returns the rows it reached, the first ``len(result)`` of ``rows``, in ascending order (rows never
    reached are never written: Linux commits no memory to them)."""
    # channels_last is faster on CUDA and, with oneDNN, on CPU too (about 1.8x for EfficientNet-Lite0).
    # Moved outside inference mode: parameters converted inside it could never train again.
    extractor.eval().to(device, memory_format=torch.channels_last)
    use_cuda = device.type == "cuda"
    n = len(loader.dataset)
    rows = np.arange(n) if rows is None else rows
    accelerate = onnx_runtime and device.type == "cpu" and n >= ORT_MIN_IMAGES
    codes, labels, runner, done = np.zeros((n, 0), np.float32), [], None, 0
    clock = pytorch_time if pytorch_time is not None else {}
    clock.update(seconds=0.0, images=0)
    with torch.inference_mode(), progress_bar(description, n) as advance:
        start = time.perf_counter()
        for images, targets in loader:
            if accelerate and done >= torch_first:
                accelerate, runner = False, onnx_pass(extractor, images)
            if runner is not None:
                out = runner(images)
            else:
                images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda and torch.cuda.is_bf16_supported()):
                    out = extractor(images)
                clock["seconds"] += time.perf_counter() - start
                clock["images"] += len(targets)
            start = time.perf_counter()
            if not done:
                codes = np.empty((n, out.shape[1]), np.float32)
            codes[rows[done:done + len(targets)]] = out.float().cpu().numpy()
            labels.append(targets)
            done += len(targets)
            advance(len(targets))
            if deadline is not None and time.monotonic() >= deadline and at_least <= done < n:
                break
    ordered = torch.cat(labels).numpy().astype(np.int64) if labels else np.zeros(0, np.int64)
    result = np.zeros((n, *ordered.shape[1:]), np.int64)
    result[rows[:done]] = ordered
    if done == n:
        return codes, result
    reached = np.sort(rows[:done])
    return codes[reached], result[reached]


def dataset_codes(backbone: Backbone, spec: DatasetSpec, split: str, config: FitConfig, layer=None,
                  cache: Path | None = None, hflip: bool = False, ranks: "DistContext | None" = None,
                  deadline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CNN codes of one split through the same decode + eval transform that prediction uses.

    With a ``cache`` folder the codes are kept in ``<cache>/codes/<split>-<key>.npz``, one entry a
    chunk of about ``CODES_CHUNK`` images written as the pass goes, each keyed by its files and the
    model's current weights (``tlpipe.cache``): a second fit on the same data does not extract again,
    a killed pass resumes from its last whole chunk, and a fine-tuned backbone never reads the
    pretrained one's codes. Under torchrun (``ranks``) each rank extracts its shard of a chunk's
    batches (all of them when there are fewer batches than ranks), every rank gets all the codes,
    and rank 0 keeps them in the cache. ``deadline`` (``time.monotonic()``, one process): the pass
    stops at the first batch past it, once one image of each class is in (the first of the split
    when it is in ``stratified_order``), and returns the codes of the first images it reached."""
    if deadline is not None and ranks is not None and ranks.enabled:
        raise ValueError("a deadline would stop the ranks at different batches: it is for one process")
    layer = config.layer if layer is None else layer
    device = resolve_device(config.device)
    samples = spec.splits[split]
    identity = {**backbone.cache_identity(), "device": device.type, "layer": resolve_layer(backbone.model, layer),
                "layer_relu": config.layer_relu, **({"hflip": True} if hflip else {})}
    bounds = chunk_bounds(len(samples)) if cache is not None else [(0, len(samples))]  # chunks are for the cache
    folder = Path(cache) / "codes" if cache is not None else None
    floor = 0 if deadline is None or spec.multilabel else len(set(s.label for s in samples))
    with CodeExtractor(backbone.model, layer, config.layer_relu, hflip) as extractor:
        def parts():
            for start, end in bounds:
                if deadline is not None and start and time.monotonic() >= deadline:
                    return
                chunk = samples[start:end]
                part = _chunk_codes(extractor, chunk, folder and _entry(folder, split, chunk, identity), backbone, config,
                                    device, split, ranks, deadline, max(0, floor - start))
                yield part
                if len(part[1]) < len(chunk):  # stopped at the deadline
                    return
        return _by_chunk(len(samples), parts())


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of ``n`` images: ``CODES_CHUNK`` each, a short tail joined to the
    chunk before it (each chunk runs in one runtime: ``extract_codes`` uses ONNX Runtime from
    ``ORT_MIN_IMAGES``)."""
    starts = list(range(0, max(n, 1), CODES_CHUNK))
    if len(starts) > 1 and n - starts[-1] < ORT_MIN_IMAGES:
        starts.pop()
    return list(zip(starts, [*starts[1:], n]))


def _entry(folder: Path, split: str, chunk: list, identity: dict) -> tuple[Path, str]:
    """A chunk's cache file and key."""
    key = cache_key(chunk, **identity)
    return folder / f"{split}-{key}.npz", key


def _chunk_codes(extractor: nn.Module, chunk: list, entry: tuple[Path, str] | None, backbone: Backbone,
                 config: FitConfig, device: torch.device, split: str, ranks: "DistContext | None",
                 deadline: float | None = None, at_least: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One chunk's codes and labels: from its cache ``entry`` (path, key) when whole there (under
    torchrun: for every rank), else extracted (sharded when every rank has a batch: a rank with
    none could not say the codes' width; as far as ``deadline`` allows, ``at_least`` images) and,
    when whole, kept there at once (by rank 0)."""
    cached = load_cached(*entry) if entry else None
    kept = cached is not None and len(cached.get("features", ())) == len(cached.get("labels", ())) == len(chunk)
    if (kept if ranks is None else ranks.all_min(int(kept)) == 1):
        return cached["features"], cached["labels"]
    sharded = ranks is not None and ranks.enabled and -(-len(chunk) // config.batch_size) >= ranks.world_size
    rows = ranks.shard(len(chunk), config.batch_size) if sharded else range(len(chunk))
    loader = eval_loader([chunk[i] for i in rows], backbone.data_config, config.batch_size, config.num_workers)
    features, labels = extract_codes(extractor, loader, device, f"Codes ({split})", deadline=deadline, at_least=at_least)
    if sharded:
        features, labels = (ranks.gathered(part, len(chunk), config.batch_size) for part in (features, labels))
    if entry and (ranks is None or ranks.is_main) and len(labels) == len(chunk):
        save_cached(*entry, {"features": features, "labels": labels})
    return features, labels


def _by_chunk(n: int, parts) -> tuple[np.ndarray, np.ndarray]:
    """The chunks' codes and labels (``parts``, an iterator) end to end in one float32 and one int64
    array, filled as each chunk comes: one chunk held beside the whole, never all of them."""
    features = labels = None
    done = 0
    for part_features, part_labels in parts:  # fewer than n rows in all when the pass stopped at its deadline
        if features is None:
            if len(part_features) == n:  # one chunk: the split itself
                return part_features.astype(np.float32, copy=False), part_labels.astype(np.int64, copy=False)
            features = np.empty((n, part_features.shape[1]), np.float32)
            labels = np.empty((n, *part_labels.shape[1:]), np.int64)
        features[done:done + len(part_features)], labels[done:done + len(part_labels)] = part_features, part_labels
        done += len(part_features)
    return features[:done], labels[:done]  # the rows never written were never committed to memory
