"""Flax NNX MoE models: one ``MoECausalLM`` for qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v2.

Public API (see ``model.py`` for the parameter paths and ``moe.py`` for the MoE pieces)::

    MoECausalLM(cfg, *, dtype, param_dtype, rngs)(input_ids [B, T]) -> logits [B, T, V] f32
    forward(model, ids)                      jitted call
    forward_hidden(model, ids, capture=...)  jitted call + each layer's MoE-block input
    param_shapes(cfg) / from_flat_params(cfg, flat, dtype) / to_flat_params(model)
"""

from mxmoe_jax.models.attention import Attention
from mxmoe_jax.models.model import (
    DecoderLayer,
    MoECausalLM,
    forward,
    forward_hidden,
    from_flat_params,
    param_shapes,
    to_flat_params,
)
from mxmoe_jax.models.moe import MoEBlock, combine, dispatch, experts_forward, route

__all__ = [
    "Attention",
    "DecoderLayer",
    "MoEBlock",
    "MoECausalLM",
    "combine",
    "dispatch",
    "experts_forward",
    "forward",
    "forward_hidden",
    "from_flat_params",
    "param_shapes",
    "route",
    "to_flat_params",
]
