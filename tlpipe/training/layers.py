"""Which layers of a timm network a fine-tune trains, and how: its stages (timm's ``group_matcher``),
the earliest frozen for a partial fine-tune, BatchNorm layers kept or re-estimated (AdaBN), and the
optimizer's groups (the backbone at a smaller learning rate than the head's)."""
from __future__ import annotations

import torch
from timm.models import group_parameters
from torch import nn


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per stage, earliest first, the classifier last (timm's ``group_matcher``)."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def freeze_stages(model: nn.Module, unfreeze_stages: int | None) -> dict[str, int]:
    """Freeze all but the last ``unfreeze_stages`` stages and the classifier (None: train all).
    Returns trainable and frozen parameter counts."""
    groups = stage_groups(model)
    n_frozen_groups = 0 if unfreeze_stages is None else max(0, len(groups) - 1 - unfreeze_stages)
    frozen = {name for group in groups[:n_frozen_groups] for name in group}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    counts = {"trainable": 0, "frozen": 0}
    for param in model.parameters():
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    return counts


def train_mode(model: nn.Module, freeze_bn_stats: bool = False) -> None:
    """``model.train()``, except BatchNorm layers whose parameters are frozen stay in eval mode, so
    their running statistics are not changed by the new data; with ``freeze_bn_stats``, every
    BatchNorm layer does (small batches of a small dataset give noisy statistics)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if freeze_bn_stats or (params and not any(p.requires_grad for p in params)):
                module.eval()


def trained_batchnorms(model: nn.Module, freeze_bn_stats: bool) -> list[nn.Module]:
    """The BatchNorm layers ``train_mode`` leaves in training mode (their statistics move)."""
    if freeze_bn_stats:
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and any(p.requires_grad for p in m.parameters(recurse=False))]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, layers: list[nn.Module], batches, device: torch.device) -> None:
    """AdaBN (Li et al. 2016): ``layers``' running statistics re-estimated on ``batches`` of the
    training images (a cumulative average, the rest of the network in eval mode). Training in
    ``train_mode`` normalizes with batch statistics: re-estimated, the eval-mode codes an LP-FT
    probe is fitted on are what the first training steps see, not the ImageNet statistics' view of
    far data."""
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    for images, _ in batches:
        model(images.to(device, memory_format=torch.channels_last))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()


def param_groups(model: nn.Module, lr: float, backbone_mult: float, weight_decay: float) -> list[dict]:
    """AdamW groups: head at ``lr``, backbone at ``lr * backbone_mult``; no decay on biases and norms."""
    head = {id(p) for p in model.get_classifier().parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((id(param) in head, param.ndim <= 1), []).append(param)
    return [
        {"params": params, "lr": lr if is_head else lr * backbone_mult, "weight_decay": 0.0 if no_decay else weight_decay,
         "name": ("head" if is_head else "backbone") + ("_no_decay" if no_decay else "")}
        for (is_head, no_decay), params in sorted(groups.items())
    ]
