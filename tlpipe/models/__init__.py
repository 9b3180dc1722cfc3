"""Backbones (weights and their preprocessing) and the CNN codes they produce."""
from tlpipe.models.backbones import (
    DEFAULT_BACKBONE,
    OFFLINE_BACKBONES,
    Backbone,
    WeightSource,
    create_backbone,
    feature_state_dict,
    offline_backbones,
    state_dict_sha256,
)
from tlpipe.models.features import PENULTIMATE, CodeExtractor, extract_codes, feature_layers, resolve_layer

__all__ = [
    "DEFAULT_BACKBONE", "OFFLINE_BACKBONES", "PENULTIMATE", "Backbone", "CodeExtractor", "WeightSource",
    "create_backbone", "extract_codes", "feature_state_dict", "feature_layers", "offline_backbones", "resolve_layer", "state_dict_sha256",
]
