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
    set_rotation,
    swiglu_stacks,
    to_flat_params,
)
from mxmoe_jax.models.moe import (
    MLP,
    ExpertWeights,
    Hooks,
    MoEBlock,
    SchemeGroup,
    combine,
    dispatch,
    moe_forward,
    route,
    swiglu,
)

__all__ = [
    "MLP",
    "Attention",
    "ExpertWeights",
    "Hooks",
    "SchemeGroup",
    "moe_forward",
    "set_rotation",
    "swiglu",
    "swiglu_stacks",
    "DecoderLayer",
    "MoEBlock",
    "MoECausalLM",
    "combine",
    "dispatch",
    "forward",
    "forward_hidden",
    "from_flat_params",
    "param_shapes",
    "route",
    "to_flat_params",
]
