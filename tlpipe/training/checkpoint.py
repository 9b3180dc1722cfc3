"""A fine-tune's checkpoints: after each epoch, everything needed to go on exactly (model,
optimizer, scheduler, scaler, the loop's state, the RNG) in ``checkpoint.pt``, and the best
epoch's weights in ``best.pt``. Each is written atomically, by rank 0 alone; a checkpoint of
another run (its ``fingerprint`` differs) is never resumed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tlpipe.utils import atomic_write, read_json, write_json

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
BATCH = "batch.json"  # the batch size the run started with: its LR schedule counts that many images a step


@dataclass(frozen=True)
class Checkpoints:
    folder: Path | None  # None: nothing saved, nothing resumed
    fingerprint: str = ""  # what the run is (config + data)
    writer: bool = True  # this process writes them (rank 0 under DDP)

    def save(self, model: nn.Module, optimizer, scheduler, scaler, state: dict) -> None:
        if self.folder is None or not self.writer:
            return
        _save(self.folder / CHECKPOINT, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "state": state, "torch_rng": torch.get_rng_state(),
            "fingerprint": self.fingerprint,
        })

    def restore(self, model: nn.Module, optimizer, scheduler, scaler, state: dict) -> int:
        """Load this run's checkpoint into the objects and ``state``; the epoch it resumes from (0: none)."""
        path = self.folder / CHECKPOINT if self.folder else None
        if path is None or not path.exists():
            return 0
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") != self.fingerprint:
            return 0  # another config or other data: train afresh (the new checkpoint replaces it)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when written on a CPU or under bf16: an fp16 GPU's scaler starts afresh
            scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        state.update(saved["state"])
        return state["epoch"]

    def started_batch(self, batch_size: int, fits: bool) -> int:
        """The batch size to train with: the one this run started with when it is resumed (its
        scheduler's steps were counted with it) and it still ``fits`` (a GPU's micro-batches absorb
        less memory), else ``batch_size``, kept for a resume."""
        path = self.folder / BATCH if self.folder else None
        try:
            saved = read_json(path) if path else {}
        except (OSError, ValueError):
            saved = {}
        if isinstance(saved, dict) and saved.get("fingerprint") == self.fingerprint and isinstance(saved.get("batch_size"), int):
            return saved["batch_size"] if fits or saved["batch_size"] <= batch_size else batch_size
        if path is not None and self.writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(path, {"fingerprint": self.fingerprint, "batch_size": batch_size})
        return batch_size

    def save_best(self, weights: dict, epoch: int) -> None:
        if self.folder is not None and self.writer:
            _save(self.folder / BEST, {"model": weights, "epoch": epoch})

    def best(self) -> dict | None:
        """The best epoch's weights as saved (a resumed run that trains no further has only these)."""
        path = self.folder / BEST if self.folder else None
        return torch.load(path, map_location="cpu", weights_only=True)["model"] if path and path.exists() else None


def _save(path: Path, payload: dict) -> None:
    atomic_write(path, lambda f: torch.save(payload, f), mode="wb")
