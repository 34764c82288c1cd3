"""Walking a model layer by layer on calibration tokens, through the model's own modules.

Tracing and calibration both need, for every decoder layer, the FP hidden state entering the MoE
block (after attention and the post-attention norm) and the layer output (the next layer's FP
input, so quantization errors never accumulate: the original's protocol). Attention, norms and
dense layers run as the model's own modules (``DecoderLayer.attention_residual``,
``post_attn_norm``, ``DecoderLayer.__call__``); every MoE block runs the one MoE forward,
``models.moe.moe_forward``, in its padded layout (dense batched matmuls over ``[E, C, ·]`` groups,
where a ragged matmul on the CPU is ~20x slower), one compilation per group capacity for all
layers of the same shape.

Under a Hadamard rotation the model carries the online down_proj rotation itself
(``models.set_rotation``, which ``calibrate.rotate_for_calibration`` applies): nothing here
applies signs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.models import moe as moe_lib
from mxmoe_jax.models.model import attention_part
from mxmoe_jax.models.moe import capacity_for, route


@nnx.jit
def embed(model, ids: jax.Array) -> jax.Array:
    """``[B, T]`` ids -> the first layer's input ``[B, T, D]`` (model dtype)."""
    return model.embed_tokens(ids)


@nnx.jit
def _decoder_layer(layer, x: jax.Array) -> jax.Array:
    return layer(x, jnp.arange(x.shape[1], dtype=jnp.int32))


@nnx.jit
def routing(block, x_td: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(topk_idx [T, k], topk_weight [T, k], largest group size)`` of ``block`` on ``x [T, D]``
    (the block's own router and routing)."""
    idx, wt = route(block.router_logits(x_td), block.cfg)
    return idx, wt, jnp.max(jnp.bincount(idx.reshape(-1), length=block.cfg.num_experts))


_USED_CAPACITIES: set[int] = set()  # capacities already compiled in this process


def chunk_capacity(block, x_td: jax.Array) -> int:
    """The padded group capacity for ``block`` on this chunk (one host sync).

    Reuses a capacity seen before when it wastes at most half again the rows needed, so layers
    and chunks with similar loads share one compiled program instead of compiling their own.
    """
    need = int(routing(block, x_td)[2])
    fits = [c for c in _USED_CAPACITIES if need <= c <= max(1.5 * need, 8)]
    cap = min(fits) if fits else capacity_for(need)
    _USED_CAPACITIES.add(cap)
    return cap


@functools.partial(nnx.jit, static_argnames="capacity")
def _moe_padded(block, x_td: jax.Array, *, capacity: int) -> jax.Array:
    return moe_lib.moe_forward(block, x_td, layout="padded", capacity=capacity)


def moe_block(block, x_td: jax.Array, *, capacity: int | None = None) -> jax.Array:
    """The FP MoE block on ``x [T, D]`` -> ``[T, D]`` f32: ``moe_forward`` in the padded layout
    (``capacity``: >= the largest group; default `chunk_capacity`)."""
    capacity = chunk_capacity(block, x_td) if capacity is None else capacity
    return _moe_padded(block, x_td, capacity=capacity)


def run_layer(layer, x_btd: jax.Array) -> jax.Array:
    """One decoder layer in FP, ``[B, T, D] -> [B, T, D]``: ``layer(x, positions)``, its MoE block
    in the padded layout (`moe_block`)."""
    if not layer.is_moe:
        return _decoder_layer(layer, x_btd)
    h, xn = attention_part(layer, x_btd)
    moe = moe_block(layer.mlp, xn.reshape(-1, xn.shape[-1]))
    return (h + moe.reshape(h.shape).astype(h.dtype)).astype(h.dtype)


@nnx.jit
def _final_norm(norm, x: jax.Array) -> jax.Array:
    return norm(x)


def final_hidden(model, x: jax.Array) -> jax.Array:
    """The final norm of the last layer's output (the original's ``last_hidden_state``)."""
    return _final_norm(model.final_norm, x)  # pass the norm alone: nnx.jit flattens its args


def iter_batches(n: int, per: int):
    """``slice`` objects covering ``range(n)`` in steps of ``per``."""
    for i in range(0, n, per):
        yield slice(i, min(i + per, n))


def windows_per_batch(batch_tokens: int, seqlen: int) -> int:
    return max(1, batch_tokens // seqlen)


def to_host(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)
