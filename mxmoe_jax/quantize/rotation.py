"""The Hadamard-rotated model: ``quant.rotation.rotate_params`` on its weights, and the online
down_proj rotation turned on in every SwiGLU stack (``models.set_rotation``), so the model's own
forward is the rotated model's forward (same logits as the unrotated model, up to rounding)."""

from __future__ import annotations

from mxmoe_jax.models import from_flat_params, set_rotation, to_flat_params
from mxmoe_jax.quant.rotation import Rotation, rotate_params


def rotate_model(model, *, seed: int = 0, online_down: bool = True) -> tuple[object, Rotation]:
    """``(rotated copy of model (same dtype), Rotation)``; the copy's forward applies the online
    rotation of every down_proj input when ``online_down``."""
    cfg, flat, rot = rotate_params(model.cfg, to_flat_params(model), seed=seed,
                                   online_down=online_down)
    out = from_flat_params(cfg, flat, dtype=model.dtype)
    if online_down:
        set_rotation(out, rot)
    return out, rot
