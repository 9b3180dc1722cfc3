"""Frozen stages run once: a partial fine-tune's leading stages do not train, so an image seen
without augmentation (every val image; train images when augmentation is off) gives the same
output there in every epoch and every trial. ``FrozenPrefix`` finds those modules, computes their
outputs once, and runs the network from there.

It works on any timm model whose forward calls its leading children in order (EfficientNet,
MobileNet, ResNet, ConvNeXt, RegNet...), and proves it: the model's logits from the cached outputs
must equal its logits from the images, on a probe batch, or the fit runs the plain way.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tlpipe.budget import raise_if_stopped
from tlpipe.training.memory import available_memory

PROBE_TOLERANCE = 1e-4  # largest |logit difference| between the two paths on the probe batch
HOST_MEMORY_SHARE = 0.25  # the cached outputs may take this share of the host's available RAM


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _leading_frozen(parent: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, name) of the children that run before the first trainable parameter: frozen (or
    parameter-free) children, then the leading ones of a partly frozen ``nn.Sequential``."""
    slots: list[tuple[nn.Module, str]] = []
    for name, child in parent.named_children():
        if _frozen(child):
            slots.append((parent, name))
            continue
        if isinstance(child, nn.Sequential):
            slots += _leading_frozen(child)
        break
    return slots


class _Outputs(Dataset):
    """Cached frozen-stage outputs by index, keyed as ``CachedImages`` is (``index`` or ``(index, seed)``)."""

    def __init__(self, outputs: torch.Tensor, labels: list[int]):
        self.outputs, self.labels = outputs, labels

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, key):
        index = key[0] if isinstance(key, tuple) else key
        return self.outputs[index], self.labels[index]


@dataclass
class FrozenPrefix:
    model: nn.Module
    slots: list[tuple[nn.Module, str]]  # where the frozen leading modules sit, in forward order

    def __post_init__(self):
        self.modules = [getattr(parent, name) for parent, name in self.slots]

    @classmethod
    def find(cls, model: nn.Module, input_size: tuple[int, int, int], device: torch.device) -> "FrozenPrefix | None":
        """The frozen prefix of ``model`` (parameters already frozen), or None when it has none with
        weights, or when running from its outputs does not reproduce the model's logits."""
        prefix = cls(model, _leading_frozen(model))
        if not any(list(module.parameters()) for module in prefix.modules):
            return None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                probe = torch.randn(2, *input_size, device=device).to(memory_format=torch.channels_last)
                hidden = prefix.run(probe)
                if hidden.ndim != 4:
                    return None
                with prefix.skipped():
                    shortcut = model(hidden.to(memory_format=torch.channels_last))
                exact = (shortcut - model(probe)).abs().max().item() <= PROBE_TOLERANCE
        except (RuntimeError, TypeError, ValueError):  # shapes that do not chain: not a plain prefix
            return None
        finally:
            model.train(was_training)
        return prefix if exact else None

    def run(self, images: torch.Tensor) -> torch.Tensor:
        for module in self.modules:
            images = module(images)
        return images

    def feeding(self, loader: DataLoader):
        """The context to run the model in on ``loader``'s batches: prefix skipped for cached outputs."""
        return self.skipped() if isinstance(loader.dataset, _Outputs) else nullcontext()

    @contextmanager
    def skipped(self) -> Iterator[None]:
        """The model with its frozen prefix replaced by identities: it takes the prefix's outputs."""
        for parent, name in self.slots:
            setattr(parent, name, nn.Identity())
        try:
            yield
        finally:
            for (parent, name), module in zip(self.slots, self.modules):
                setattr(parent, name, module)

    def cached_loader(self, loader: DataLoader, device: torch.device, precision, kept: "FrozenOutputs",
                      ranks: int = 1) -> DataLoader | None:
        """A loader over the prefix's outputs for the images ``loader`` draws (its dataset's transform
        must be deterministic), batched and sampled as ``loader``; None when they would take more than
        ``HOST_MEMORY_SHARE`` of the host's RAM (shared by ``ranks`` processes). The outputs are
        taken from ``kept``, or computed and kept there for the next trials."""
        epochs_vary = hasattr(loader.sampler, "set_epoch")  # a train sampler: every index, order per epoch
        rows = list(range(len(loader.dataset))) if epochs_vary else list(loader.sampler)
        outputs = kept.outputs(self._key(loader.dataset, rows),
                               lambda: self._outputs(loader, rows, device, precision, HOST_MEMORY_SHARE / ranks))
        if outputs is None:
            return None
        labels = [loader.dataset.labels[i] for i in rows]
        return DataLoader(_Outputs(outputs, labels), batch_size=loader.batch_size,
                          sampler=loader.sampler if epochs_vary else None, drop_last=loader.drop_last,
                          pin_memory=device.type == "cuda")

    @torch.no_grad()
    def _outputs(self, loader: DataLoader, rows: list[int], device: torch.device, precision, share: float) -> torch.Tensor | None:
        plain = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=rows, num_workers=loader.num_workers,
                           worker_init_fn=loader.worker_init_fn, multiprocessing_context=loader.multiprocessing_context)
        outputs = None
        self.model.eval()
        for start, (images, _) in zip(range(0, len(rows), loader.batch_size), plain):
            raise_if_stopped()
            with precision.autocast():
                hidden = self.run(images.to(device, memory_format=torch.channels_last)).cpu()
            if outputs is None:
                if len(rows) * hidden[0].numel() * hidden.element_size() > share * available_memory(torch.device("cpu")):
                    return None
                outputs = torch.empty((len(rows), *hidden.shape[1:]), dtype=hidden.dtype)
            outputs[start:start + len(hidden)] = hidden
        return outputs

    def _key(self, dataset, rows: list[int]) -> str:
        """What the outputs depend on: the prefix's modules and weights, the images and their transform."""
        digest = hashlib.sha256(repr([name for _, name in self.slots]).encode())
        for module in self.modules:
            for tensor in module.state_dict().values():
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        source = getattr(dataset.images, "filename", None) or id(dataset.images)
        digest.update(repr([source, len(dataset), rows, repr(dataset.transform)]).encode())
        return digest.hexdigest()


KEPT_ENTRIES = 2  # val's and train's


class FrozenOutputs:
    """The frozen-stage outputs a study's fine-tunes share: made once by whoever runs the study and
    handed to each, so the next trial reuses the last one's (computing them costs a pass over the
    images). The latest ``KEPT_ENTRIES`` by key, oldest dropped first; freed with the object."""

    def __init__(self):
        self._kept: dict[str, torch.Tensor] = {}  # oldest first

    def outputs(self, key: str, compute: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """The outputs kept under ``key``, else ``compute()``'s (None: not kept, too large)."""
        outputs = self._kept.pop(key, None)
        if outputs is None:
            outputs = compute()
            if outputs is None:
                return None
        self._kept[key] = outputs
        while len(self._kept) > KEPT_ENTRIES:
            self._kept.pop(next(iter(self._kept)))
        return outputs
