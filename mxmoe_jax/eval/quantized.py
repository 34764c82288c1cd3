"""Evaluate a model with its expert blocks quantized by a plan (reference form: fake-quant).

A plan comes from ``solve``'s qconfig.json (mixed precision) or from one scheme name (uniform).
Weights are quantized offline (RTN, or GPTQ on calibration windows, block after block as the
original), activations per token at each quantized block's input; with ``hadamard`` the model is
first rotated (QuaRot-style, with the online rotation of every down_proj input). This is the
ground truth that the kernels are held to; it measures accuracy, not speed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mxmoe_jax.quant.fakequant import QuantPlan


def plan_from_qconfig(cfg, qconfig: dict) -> QuantPlan:
    """The QuantPlan of a qconfig.json (``mxmoe-jax/qconfig/1``), checked against ``cfg``."""
    from mxmoe_jax.alloc.qconfig import validate_qconfig

    validate_qconfig(qconfig)
    m = {}
    for layer, experts in qconfig["layers"].items():
        li = int(layer)
        if not (0 <= li < cfg.num_layers) or not cfg.is_moe_layer(li):
            raise ValueError(f"qconfig: layer {layer} is not a MoE layer of this model")
        top = cfg.num_experts + (1 if cfg.shared_intermediate_size > 0 else 0)
        for e, blocks in experts.items():
            if not 0 <= int(e) < top:
                raise ValueError(f"qconfig: layer {layer} has no expert {e} (0..{top - 1})")
            for b, s in blocks.items():
                m[(li, int(e), b)] = s
    return QuantPlan.from_mapping(m)


def quantized_logits_fn(cfg, flat: dict[str, np.ndarray], plan: QuantPlan | None, *,
                        method: str = "rtn", hadamard: bool = False, seed: int = 0,
                        calib_windows: np.ndarray | None = None, progress: bool = False
                        ) -> Callable:
    """``f(ids [B, T]) -> logits`` of the model given by ``(cfg, flat)`` quantized by ``plan``."""
    import jax.numpy as jnp

    from mxmoe_jax.models import from_flat_params
    from mxmoe_jax.quant.fakequant import fake_quantize_params, make_quant_forward
    from mxmoe_jax.quant.model_gptq import gptq_model
    from mxmoe_jax.quant.rotation import rotate_params

    if method not in ("rtn", "gptq"):
        raise ValueError(f"method: {method!r} is not 'rtn' or 'gptq'")
    rotation = None
    if hadamard:
        cfg, flat, rotation = rotate_params(cfg, flat, seed=seed, online_down=True)
    quantized = None
    if plan is not None and method == "gptq":
        if calib_windows is None:
            raise ValueError("method gptq needs calibration text (--calib)")
        fp_model = from_flat_params(cfg, flat, jnp.float32)
        quantized = gptq_model(fp_model, calib_windows, plan, rotation=rotation,
                               progress=progress)
    if plan is not None:
        flat = fake_quantize_params(cfg, flat, plan, quantized)
    model = from_flat_params(cfg, flat, jnp.float32)
    forward = make_quant_forward(plan, rotation)
    return lambda ids: forward(model, ids)
