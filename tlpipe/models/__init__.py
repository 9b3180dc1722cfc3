"""Models stage: backbones (weights and their preprocessing, ``backbones``) and the CNN codes they
produce for a dataset split, cached between fits (``features``), through hooks that always come off
(``hooks``), in PyTorch or, for the frozen passes on a CPU, ONNX Runtime (``runtime``)."""
from tlpipe.models.backbones import (
    DEFAULT_BACKBONE,
    OFFLINE_BACKBONES,
    Backbone,
    WeightSource,
    build_backbone,
    create_backbone,
    feature_state_dict,
    offline_backbones,
    state_dict_sha256,
)
from tlpipe.models.features import (
    PENULTIMATE, CodeExtractor, chunk_bounds, dataset_codes, extract_codes, feature_layers, pool_tap, resolve_layer,
)
from tlpipe.models.hooks import Hooks

__all__ = [
    "DEFAULT_BACKBONE", "OFFLINE_BACKBONES", "PENULTIMATE", "Backbone", "CodeExtractor", "Hooks", "WeightSource",
    "build_backbone", "chunk_bounds", "create_backbone", "dataset_codes", "extract_codes", "feature_state_dict",
    "feature_layers", "offline_backbones", "pool_tap", "resolve_layer", "state_dict_sha256",
]
