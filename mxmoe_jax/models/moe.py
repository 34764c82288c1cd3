"""The one MoE block every family uses: route -> dispatch -> experts -> combine (+ shared expert).

Pieces, each callable alone (calibration runs them per layer; quantization substitutes weights
and an activation fake-quant):

* ``route(logits [T, E] f32, cfg) -> (topk_idx [T, k] int32, topk_weight [T, k] f32)``:
  ``softmax_topk`` (qwen2_moe, qwen3_moe, olmoe; mixtral with renormalisation, which equals a
  softmax over the top-k logits), ``ds_greedy`` and ``ds_group_limited_greedy`` (DeepSeek-V2,
  times ``routed_scaling_factor``), all as in transformers' routers.
* ``dispatch(x [T, D], topk_idx, num_experts) -> Dispatch``: the T*k (token, slot) pairs sorted by
  expert (a stable argsort of static size T*k, so it jits), ``x_sorted [T*k, D]`` and
  ``group_sizes [E]`` int32.
* ``experts_forward(x_sorted, group_sizes, gate, up, down)``: ``grouped_matmul`` for gate and up,
  ``silu(gate) * up``, ``grouped_matmul`` for down -> ``[T*k, D]``. Expert weights are
  ``gate/up [E, D, I]``, ``down [E, I, D]``. An optional ``act_quant(x_rows, group_sizes, block)``
  (block "gate_up" or "down") is applied to the rows entering each grouped matmul.
* ``combine(y_sorted, dispatch, topk_weight) -> [T, D]``: unsort, weight, sum over the k slots.

Dtypes: router logits are computed in f32 from f32-cast inputs and weights (as DeepSeek-V2 does;
transformers' Qwen/Mixtral/OLMoE routers use the model dtype, so bf16 routing can differ from theirs
at near ties, never in fp32); routing weights are f32; grouped matmuls accumulate in f32; the
weighted sum is f32, cast once to the block's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models.layers import MLP, linear, matmul_precision
from mxmoe_jax.ops import grouped_matmul

# act_quant(x_rows [M, K], group_sizes [E], block) -> [M, K]; block is "gate_up" or "down"
ActQuant = Callable[[jax.Array, jax.Array, str], jax.Array]


# ---------------------------------------------------------------------------------- routing

def softmax_topk(logits: jax.Array, k: int, *, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over all experts (f32), top-k, optionally renormalise the k weights to sum to 1."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [T, E]
    weight, idx = jax.lax.top_k(probs, k)  # [T, k]
    if normalize:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    return idx.astype(jnp.int32), weight


def ds_greedy(logits: jax.Array, k: int, *, scaling: float) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V2 ``greedy``: softmax, top-k, times ``routed_scaling_factor`` (no renorm)."""
    idx, weight = softmax_topk(logits, k, normalize=False)
    return idx, weight * scaling


def ds_group_limited_greedy(logits: jax.Array, k: int, *, n_group: int, topk_group: int,
                            scaling: float) -> tuple[jax.Array, jax.Array]:
    """DeepSeek-V2 ``group_limited_greedy``: keep the ``topk_group`` groups with the highest max
    expert score, zero the others' scores, then top-k (times ``routed_scaling_factor``)."""
    t, e = logits.shape
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [T, E]
    group_scores = scores.reshape(t, n_group, e // n_group).max(axis=-1)  # [T, G]
    _, group_idx = jax.lax.top_k(group_scores, topk_group)  # [T, topk_group]
    group_keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], group_idx].set(True)
    expert_keep = jnp.repeat(group_keep, e // n_group, axis=-1)  # [T, E]
    scores = jnp.where(expert_keep, scores, 0.0)
    weight, idx = jax.lax.top_k(scores, k)
    return idx.astype(jnp.int32), weight * scaling


def route(logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Family routing: logits ``[T, E]`` -> ``(topk_idx [T, k] int32, weight [T, k] f32)``."""
    k = cfg.num_experts_per_tok
    if cfg.router == "softmax":
        idx, weight = softmax_topk(logits, k, normalize=cfg.norm_topk_prob)
        if cfg.routed_scaling_factor != 1.0:
            weight = weight * cfg.routed_scaling_factor
        return idx, weight
    if cfg.router == "ds_greedy":
        return ds_greedy(logits, k, scaling=cfg.routed_scaling_factor)
    if cfg.router == "ds_group_limited":
        return ds_group_limited_greedy(logits, k, n_group=cfg.n_group, topk_group=cfg.topk_group,
                                       scaling=cfg.routed_scaling_factor)
    raise ValueError(f"unknown router {cfg.router!r}")


# ---------------------------------------------------------------------------------- dispatch

@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Dispatch:
    """The T*k (token, slot) pairs sorted by expert.

    Invariants: ``order`` is a permutation of ``range(T*k)`` over flat slot indices
    (``token * k + slot``) such that ``expert[order]`` is non-decreasing (stable: ties keep token
    order); ``token = order // k``; ``x_sorted[j] = x[token[j]]``; ``group_sizes[e]`` = number of
    pairs routed to expert e, summing to T*k.
    """

    x_sorted: jax.Array  # [T*k, D] rows grouped by expert
    group_sizes: jax.Array  # [E] int32
    order: jax.Array  # [T*k] int32 flat slot index of each sorted row
    token: jax.Array  # [T*k] int32 token of each sorted row


def dispatch(x: jax.Array, topk_idx: jax.Array, num_experts: int) -> Dispatch:
    """Sort the (token, slot) pairs of ``topk_idx [T, k]`` by expert and gather their rows."""
    t, k = topk_idx.shape
    flat = topk_idx.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return Dispatch(x_sorted=x[token], group_sizes=group_sizes, order=order, token=token)


def experts_forward(x_sorted: jax.Array, group_sizes: jax.Array, gate: jax.Array, up: jax.Array,
                    down: jax.Array, *, act_quant: ActQuant | None = None,
                    dtype=None) -> jax.Array:
    """SwiGLU experts on expert-sorted rows: ``[M, D] -> [M, D]`` (f32 result).

    ``gate, up [E, D, I]``, ``down [E, I, D]``. Rows past ``sum(group_sizes)`` give zeros.
    """
    dtype = x_sorted.dtype if dtype is None else dtype
    prec = matmul_precision(dtype)
    x = x_sorted.astype(dtype)
    if act_quant is not None:
        x = act_quant(x, group_sizes, "gate_up")
    g = grouped_matmul(x, gate.astype(dtype), group_sizes, out_dtype=jnp.float32, precision=prec)
    u = grouped_matmul(x, up.astype(dtype), group_sizes, out_dtype=jnp.float32, precision=prec)
    hidden = (jax.nn.silu(g) * u).astype(dtype)  # [M, I]
    if act_quant is not None:
        hidden = act_quant(hidden, group_sizes, "down")
    return grouped_matmul(hidden, down.astype(dtype), group_sizes, out_dtype=jnp.float32,
                          precision=prec)  # [M, D] f32


def combine(y_sorted: jax.Array, d: Dispatch, topk_weight: jax.Array) -> jax.Array:
    """Unsort expert outputs ``[T*k, D]`` and sum them weighted over the k slots: ``[T, D]`` f32."""
    t, k = topk_weight.shape
    y = jnp.zeros_like(y_sorted, dtype=jnp.float32).at[d.order].set(
        y_sorted.astype(jnp.float32))  # [T*k, D] in (token, slot) order
    y = y.reshape(t, k, -1)
    return jnp.einsum("tk,tkd->td", topk_weight.astype(jnp.float32), y,
                      precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------- modules

class Experts(nnx.Module):
    """Routed expert weights stacked per layer: ``gate/up [E, D, I]``, ``down [E, I, D]``."""

    def __init__(self, e: int, d: int, i: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 std: float = 0.02):
        init = nnx.initializers.normal(std)
        self.gate = nnx.Param(init(rngs.params(), (e, d, i), param_dtype))
        self.up = nnx.Param(init(rngs.params(), (e, d, i), param_dtype))
        self.down = nnx.Param(init(rngs.params(), (e, i, d), param_dtype))


class MoEBlock(nnx.Module):
    """Router -> top-k -> grouped experts -> combine, plus the optional (gated) shared expert.

    ``__call__(x [..., D]) -> [..., D]``; the same code for every family (routing from ``cfg``).
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.hidden_size
        self.router = linear(d, cfg.num_experts, bias=False, dtype=jnp.float32,
                             param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(cfg.num_experts, d, cfg.moe_intermediate_size,
                               param_dtype=param_dtype, rngs=rngs)
        if cfg.shared_intermediate_size > 0:
            self.shared = MLP(d, cfg.shared_intermediate_size, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        if cfg.shared_expert_gate:
            self.shared_gate = linear(d, 1, bias=False, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)

    def router_logits(self, x_td: jax.Array) -> jax.Array:
        """``[T, D] -> [T, E]`` f32 (computed in f32, as DeepSeek-V2; exact for fp32 models)."""
        w = self.router.kernel[...].astype(jnp.float32)
        return jnp.dot(x_td.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)

    def routed(self, x_td: jax.Array, *, gate=None, up=None, down=None,
               act_quant: ActQuant | None = None) -> jax.Array:
        """The routed experts' weighted sum ``[T, D]`` f32; weights can be substituted."""
        idx, weight = route(self.router_logits(x_td), self.cfg)
        d = dispatch(x_td, idx, self.cfg.num_experts)
        y = experts_forward(
            d.x_sorted, d.group_sizes,
            self.experts.gate[...] if gate is None else gate,
            self.experts.up[...] if up is None else up,
            self.experts.down[...] if down is None else down,
            act_quant=act_quant, dtype=self.dtype)
        return combine(y, d, weight)

    def shared_out(self, x_td: jax.Array) -> jax.Array | None:
        """The shared expert's output ``[T, D]`` (gated for qwen2_moe), or None."""
        if self.cfg.shared_intermediate_size <= 0:
            return None
        out = self.shared(x_td)
        if self.cfg.shared_expert_gate:
            out = jax.nn.sigmoid(self.shared_gate(x_td)) * out
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        x_td = x.reshape(-1, shape[-1]).astype(self.dtype)
        out = self.routed(x_td)
        shared = self.shared_out(x_td)
        if shared is not None:
            out = out + shared.astype(jnp.float32)
        return out.astype(self.dtype).reshape(shape)
