"""Walking a model layer by layer on calibration tokens, with the MoE pieces exposed as arrays.

Tracing and calibration both need, for every decoder layer, the FP hidden state entering the MoE
block (after attention and the post-attention norm) and the layer output (the next layer's FP
input, so quantization errors never accumulate: the original's protocol). Attention and norms run
through the model's own modules (``DecoderLayer.attention_residual``, ``post_attn_norm``, dense
``mlp``); the MoE block runs here on its parameters as plain arrays, with the model's routing
(``models.moe.route``) and the padded per-expert groups of ``loss.py``: the same function as
``MoEBlock.__call__`` (tested to match it), but dense batched matmuls instead of a ragged one
(which is ~20x slower on the CPU), and one compilation for all layers of the same shape.

Under a Hadamard rotation (``quant.rotation.rotate_params(..., online_down=True)``, as ``eval
--hadamard``) the model's own modules cannot apply the online rotation of down_proj inputs, so
the MLPs run here on arrays with the rotation's sign vectors (``MoEParams.*_down_signs``, and the
``rotation`` argument of `layer_forward` for dense layers): the same computation as
``fakequant.quant_forward(..., rotation=...)``. Without a rotation nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.calib.loss import MLPWeights, capacity_for, combine_groups, pad_groups, swiglu_parts
from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models.moe import route
from mxmoe_jax.quant.rotation import Rotation

_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEParams:
    """One MoE layer's parameters as f32 arrays.

    Invariants: ``router [D, E]``; ``routed`` stacks ``[E, ...]``; ``shared`` is None when the
    model has no shared expert; ``shared_gate [D, 1]`` only for qwen2_moe's gated shared expert;
    the ``*_down_signs`` are None without an online down_proj rotation (else ``[I]`` / ``[Is]``,
    the rotation's signs for that width: the down weights are then already pre-rotated).
    """

    router: jax.Array  # [D, E]
    routed: MLPWeights  # gate/up [E, D, I], down [E, I, D]
    shared: MLPWeights | None  # gate/up [D, Is], down [Is, D]
    shared_gate: jax.Array | None  # [D, 1]
    routed_down_signs: jax.Array | None = None  # [I] +-1 online rotation of routed down inputs
    shared_down_signs: jax.Array | None = None  # [Is] +-1, the shared expert's


def down_signs(rotation: Rotation | None, width: int) -> jax.Array | None:
    """The online down_proj rotation's signs for inputs of ``width`` as f32 (None: no rotation)."""
    s = None if rotation is None else rotation.down_signs(width)
    return None if s is None else jnp.asarray(s, jnp.float32)


def moe_params(layer, rotation: Rotation | None = None) -> MoEParams:
    """The arrays of a ``DecoderLayer`` whose ``mlp`` is an ``MoEBlock`` (cast to f32), with
    ``rotation``'s online down_proj signs (the layer's weights must be rotated by it)."""
    mlp = layer.mlp

    def f32(p):
        return jnp.asarray(p[...], jnp.float32)

    shared = None
    if hasattr(mlp, "shared"):
        shared = MLPWeights(gate=f32(mlp.shared.gate_proj.kernel),
                            up=f32(mlp.shared.up_proj.kernel),
                            down=f32(mlp.shared.down_proj.kernel))
    routed = MLPWeights(gate=f32(mlp.experts.gate), up=f32(mlp.experts.up),
                        down=f32(mlp.experts.down))
    return MoEParams(router=f32(mlp.router.kernel), routed=routed, shared=shared,
                     shared_gate=f32(mlp.shared_gate.kernel) if hasattr(mlp, "shared_gate")
                     else None,
                     routed_down_signs=down_signs(rotation, routed.down.shape[-2]),
                     shared_down_signs=None if shared is None
                     else down_signs(rotation, shared.down.shape[-2]))


def route_tokens(cfg: ModelConfig, router: jax.Array, x_td: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """The model's routing of MoE inputs ``x [T, D]``: ``(topk_idx [T, k], topk_weight [T, k])``
    (logits in f32 at HIGHEST precision, as ``MoEBlock.router_logits``)."""
    logits = jnp.dot(x_td.astype(jnp.float32), router.astype(jnp.float32), precision=_HI)
    return route(logits, cfg)


def shared_weight(p: MoEParams, x_td: jax.Array) -> jax.Array:
    """Per-token weight of the shared expert's output ``[T]``: its sigmoid gate, or 1."""
    if p.shared_gate is None:
        return jnp.ones(x_td.shape[:1], jnp.float32)
    z = jnp.dot(x_td.astype(jnp.float32), p.shared_gate, precision=_HI)[:, 0]
    return jax.nn.sigmoid(z)


@functools.partial(jax.jit, static_argnames="cfg")
def route_with_max(cfg: ModelConfig, router: jax.Array, x_td: jax.Array):
    """``(topk_idx, topk_weight, largest group size)`` of a token chunk."""
    idx, wt = route_tokens(cfg, router, x_td)
    return idx, wt, jnp.max(jnp.bincount(idx.reshape(-1), length=cfg.num_experts))


_USED_CAPACITIES: set[int] = set()  # capacities already compiled in this process


def chunk_capacity(cfg: ModelConfig, p: MoEParams, x_td: jax.Array) -> int:
    """The padded group capacity for this chunk (one host sync).

    Reuses a capacity seen before when it wastes at most half again the rows needed, so layers
    and chunks with similar loads share one compiled program instead of compiling their own.
    """
    need = int(route_with_max(cfg, p.router, x_td)[2])
    fits = [c for c in _USED_CAPACITIES if need <= c <= max(1.5 * need, 8)]
    cap = min(fits) if fits else capacity_for(need)
    _USED_CAPACITIES.add(cap)
    return cap


@functools.partial(jax.jit, static_argnames=("cfg", "capacity"))
def moe_forward(cfg: ModelConfig, p: MoEParams, x_td: jax.Array, *, capacity: int):
    """The MoE block ``[T, D] -> [T, D]`` f32 (routed + gated shared expert), FP weights."""
    idx, wt = route_tokens(cfg, p.router, x_td)
    groups = pad_groups(x_td, idx, wt, cfg.num_experts, capacity)
    y = swiglu_parts(groups.x, p.routed, _bmm, p.routed_down_signs)[3]
    out = combine_groups(groups, y, x_td.shape[0])
    if p.shared is not None:
        ys = swiglu_parts(x_td.astype(jnp.float32), p.shared, _mm, p.shared_down_signs)[3]
        out = out + shared_weight(p, x_td)[:, None] * ys
    return out


def _bmm(x, w):
    return jnp.einsum("ecd,edi->eci", x, w.astype(jnp.float32), precision=_HI)


def _mm(x, w):
    return jnp.dot(x, w.astype(jnp.float32), precision=_HI)


@nnx.jit
def embed(model, ids: jax.Array) -> jax.Array:
    """``[B, T]`` ids -> the first layer's input ``[B, T, D]`` (model dtype)."""
    return model.embed_tokens(ids)


@nnx.jit
def attention_part(layer, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(h, xn)``: the residual stream after attention and the MLP input ``post_attn_norm(h)``."""
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)
    h = layer.attention_residual(x, positions)
    return h, layer.post_attn_norm(h)


@nnx.jit
def _dense_mlp(layer, xn: jax.Array) -> jax.Array:
    return layer.mlp(xn)


def dense_params(layer) -> MLPWeights:
    """The arrays of a dense (non-MoE) layer's SwiGLU MLP, f32."""
    mlp = layer.mlp
    return MLPWeights(*(jnp.asarray(getattr(mlp, f"{b}_proj").kernel[...], jnp.float32)
                        for b in ("gate", "up", "down")))


@jax.jit
def _dense_mlp_rotated(w: MLPWeights, signs: jax.Array, xn: jax.Array) -> jax.Array:
    """A dense MLP with the online rotation of its down_proj input (f32 out)."""
    return swiglu_parts(xn.astype(jnp.float32), w, _mm, signs)[3]


@nnx.jit
def _final_norm(norm, x: jax.Array) -> jax.Array:
    return norm(x)


def final_hidden(model, x: jax.Array) -> jax.Array:
    """The final norm of the last layer's output (the original's ``last_hidden_state``)."""
    return _final_norm(model.final_norm, x)  # pass the norm alone: nnx.jit flattens its args


def layer_forward(cfg: ModelConfig, layer, x_btd: jax.Array, p: MoEParams | None = None,
                  rotation: Rotation | None = None) -> jax.Array:
    """One decoder layer in FP, ``[B, T, D] -> [B, T, D]``: equals ``layer(x, positions)``, or
    with ``rotation`` (online down_proj part) that layer of ``quant_forward(..., rotation=)``.

    ``p``: this layer's `moe_params` with the same rotation (pass it when calling repeatedly, to
    skip the extraction).
    """
    h, xn = attention_part(layer, x_btd)
    if not layer.is_moe:
        if rotation is None or not rotation.online_down:
            return h + _dense_mlp(layer, xn)
        w = dense_params(layer)
        m = _dense_mlp_rotated(w, down_signs(rotation, w.down.shape[-2]), xn)
        return (h + m.astype(h.dtype)).astype(h.dtype)
    p = moe_params(layer, rotation) if p is None else p
    x_td = xn.reshape(-1, xn.shape[-1])
    moe = moe_forward(cfg, p, x_td, capacity=chunk_capacity(cfg, p, x_td))
    return (h + moe.reshape(h.shape).astype(h.dtype)).astype(h.dtype)


def iter_batches(n: int, per: int):
    """``slice`` objects covering ``range(n)`` in steps of ``per``."""
    for i in range(0, n, per):
        yield slice(i, min(i + per, n))


def windows_per_batch(batch_tokens: int, seqlen: int) -> int:
    return max(1, batch_tokens // seqlen)


def to_host(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)
