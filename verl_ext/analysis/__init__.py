"""Internal policy entropy analysis (BuPO spec section 2): one-pass capture, dH tables, boundary layer, plots."""

from verl_ext.analysis.boundary import CONFIG_KEY, BoundaryResult, find_boundary_layer
from verl_ext.analysis.capture import (
    STREAMS,
    SUPPORTED_MODEL_TYPES,
    LayerCapture,
    capture_layers,
    check_supported,
    prediction_mask,
    response_token_mask,
)
from verl_ext.analysis.decompose import (
    COLUMNS,
    CONVENTIONS,
    MODULES,
    ProfileAccumulator,
    decompose_capture,
    entropy_profile,
    full_head_weight,
    layer_entropy_profile,
    profile_batch,
    subsample_mask,
)

__all__ = [
    "COLUMNS",
    "CONFIG_KEY",
    "CONVENTIONS",
    "MODULES",
    "STREAMS",
    "SUPPORTED_MODEL_TYPES",
    "BoundaryResult",
    "LayerCapture",
    "ProfileAccumulator",
    "capture_layers",
    "check_supported",
    "decompose_capture",
    "entropy_profile",
    "find_boundary_layer",
    "full_head_weight",
    "layer_entropy_profile",
    "prediction_mask",
    "profile_batch",
    "response_token_mask",
    "subsample_mask",
]
