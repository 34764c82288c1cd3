"""The one MoE forward every path uses: route -> dispatch -> experts -> combine (+ shared expert).

The FP model, the fake-quant reference, the kernels, calibration and GPTQ all run this code; they
differ only in the expert weights they hand it and in the hooks they attach.

**Experts as data.** A stack of SwiGLU experts (a layer's routed experts; the shared expert and a
dense MLP are stacks of one) hands the forward an ``ExpertWeights``: for each projection
(``gate_up`` and ``down``) a tuple of ``SchemeGroup``, one per scheme present, each holding the
stacked weights of the experts assigned to it (an array, a ``QuantizedWeight`` or a
``PackedWeight``: ``ops.grouped_matmul`` picks the format from the type) and their static expert
indices. A quantized ``gate_up`` is one fused ``[n, D, 2I]`` GEMM (gate columns, then up); the FP
model's separate ``gate``/``up`` Params are handed over as a ``(gate, up)`` pair (two GEMMs, no
concatenated copy of the weights per call).

Pieces:

* ``route(logits [T, E] f32, cfg) -> (topk_idx [T, k] int32, topk_weight [T, k] f32)``:
  ``softmax_topk`` (qwen2_moe, qwen3_moe, olmoe; mixtral with renormalisation, which equals a
  softmax over the top-k logits), ``ds_greedy`` and ``ds_group_limited_greedy`` (DeepSeek-V2,
  times ``routed_scaling_factor``), all as in transformers' routers.
* Two layouts of the routed rows. *Sorted* (the model and the kernels): ``dispatch`` sorts the T*k
  (token, slot) pairs by expert (a stable argsort of static size T*k, so it jits), ``combine``
  unsorts and sums them weighted. *Padded* (calibration on the CPU): ``pad_groups`` gathers each
  expert's rows into ``[E, C, D]`` (capacity ``C`` >= the largest group), so every expert matmul is
  one dense batched einsum, where a ragged matmul on the CPU is ~20x slower; ``combine_groups``.
* ``swiglu(x, weights, rows, ...)``: gate_up -> ``silu(gate) * up`` -> (online rotation) -> down,
  per scheme group, in either layout (``SortedRows`` / ``PaddedRows``).
* ``moe_forward(block, x_td, ...)``: the whole block, the one place that routes, dispatches, runs
  the experts and combines; ``MoEBlock.__call__`` is ``moe_forward`` in the sorted layout.

**Hooks** (``Hooks``, in the manner of flax's ``sow``): ``capture`` is a dict the forward fills at
trace time with its intermediates (routing, block inputs ``x``, ``g``, ``u``, the down input
``h``, the expert outputs ``y``, the shared expert's gate weight), which a jitted caller returns;
``act_quant(rows, block, expert_of_row)`` transforms the rows entering one block (calibration's
single-block activation fake-quant). Calibration substitutes weights by handing ``moe_forward`` its
own ``ExpertWeights``.

**Online down_proj rotation** (QuaRot, ``quant.rotation``): a model feature. A SwiGLU stack whose
``down_signs`` variable is set rotates every down_proj input ``h = silu(g)·u`` by
``Q_I = diag(s) H_I / sqrt(I)`` (in f32) before the pre-rotated down weights and before the down
block's activation quantization.

Dtypes: router logits are computed in f32 from f32-cast inputs and weights (as DeepSeek-V2 does;
transformers' Qwen/Mixtral/OLMoE routers use the model dtype, so bf16 routing can differ from theirs
at near ties, never in fp32); routing weights are f32; grouped matmuls accumulate in f32; the
sorted layout casts ``h`` to the compute dtype before down, the padded layout is f32 throughout
(at ``Precision.HIGHEST``); the weighted sum is f32, cast once to the block's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models.layers import linear, matmul_precision
from mxmoe_jax.ops import (
    Weight,
    dequantize_weight,
    expert_of_row,
    grouped_matmul,
    grouped_matmul_by_scheme,
    grouped_matmuls,
    weight_scheme,
)
from mxmoe_jax.quant import hadamard
from mxmoe_jax.quant.act import fake_quant_activations
from mxmoe_jax.quant.scheme import W16A16, QScheme

_HI = jax.lax.Precision.HIGHEST


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


def f32_logits(x_td: jax.Array, w_de: jax.Array) -> jax.Array:
    """``x [T, D] @ w [D, E]`` in f32 at HIGHEST precision (the router; exact for fp32 models)."""
    return jnp.dot(x_td.astype(jnp.float32), w_de.astype(jnp.float32), precision=_HI)


# ---------------------------------------------------------------------------------- sorted rows

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


def combine(y_sorted: jax.Array, d: Dispatch, topk_weight: jax.Array) -> jax.Array:
    """Unsort expert outputs ``[T*k, D]`` and sum them weighted over the k slots: ``[T, D]`` f32."""
    t, k = topk_weight.shape
    y = jnp.zeros_like(y_sorted, dtype=jnp.float32).at[d.order].set(
        y_sorted.astype(jnp.float32))  # [T*k, D] in (token, slot) order
    y = y.reshape(t, k, -1)
    return jnp.einsum("tk,tkd->td", topk_weight.astype(jnp.float32), y, precision=_HI)


# ---------------------------------------------------------------------------------- padded rows

@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Groups:
    """The (token, slot) pairs of a token chunk gathered per expert into padded groups.

    Invariants: slot ``[e, c]`` for ``c < group_sizes[e]`` holds the c-th token (in token order)
    routed to expert e: ``x[e, c] = x_td[token[e, c]]`` and ``weight[e, c]`` its routing weight;
    padding slots have ``x = 0``, ``weight = 0``, ``token = 0``, ``valid = False``.
    """

    x: jax.Array  # [E, C, D] f32
    weight: jax.Array  # [E, C] f32
    token: jax.Array  # [E, C] int32
    valid: jax.Array  # [E, C] bool (real slot, even if its weight is 0)


def capacity_for(max_group: int, *, steps_per_octave: int = 4, minimum: int = 8) -> int:
    """A static group capacity >= ``max_group``: rounded up to one of ``steps_per_octave`` sizes
    per power of two (at most ~19% padding for 4 steps), so few distinct shapes get compiled."""
    n = max(int(max_group), minimum)
    top = 1 << (n - 1).bit_length()  # next power of two >= n
    step = max(top // (2 * steps_per_octave), 1)
    return -(-n // step) * step


def pad_groups(x_td: jax.Array, topk_idx: jax.Array, topk_weight: jax.Array, num_experts: int,
               capacity: int) -> Groups:
    """Gather the rows routed to each expert into ``[E, capacity, D]`` (see `Groups`).

    Pairs beyond ``capacity`` in an expert are dropped: pass ``capacity >= max group size``.
    """
    t, k = topk_idx.shape
    flat = topk_idx.reshape(-1)  # [T*k], token-major
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    sizes = jnp.bincount(flat, length=num_experts)
    starts = jnp.cumsum(sizes) - sizes
    pos = jnp.arange(t * k) - starts[sorted_e]  # slot within the expert's group
    token = (order // k).astype(jnp.int32)
    w = topk_weight.reshape(-1)[order].astype(jnp.float32)
    e_c = (sorted_e, pos)
    gx = jnp.zeros((num_experts, capacity, x_td.shape[-1]), jnp.float32)
    gx = gx.at[e_c].set(x_td[token].astype(jnp.float32), mode="drop")
    gw = jnp.zeros((num_experts, capacity), jnp.float32).at[e_c].set(w, mode="drop")
    gt = jnp.zeros((num_experts, capacity), jnp.int32).at[e_c].set(token, mode="drop")
    gv = jnp.zeros((num_experts, capacity), bool).at[e_c].set(True, mode="drop")
    return Groups(x=gx, weight=gw, token=gt, valid=gv)


def combine_groups(groups: Groups, y_ecd: jax.Array, num_tokens: int) -> jax.Array:
    """The routed experts' weighted sum per token ``[T, D]`` f32 from per-group outputs."""
    contrib = y_ecd * groups.weight[..., None]
    return jnp.zeros((num_tokens, y_ecd.shape[-1]), jnp.float32).at[groups.token].add(contrib)


# ---------------------------------------------------------------------------------- weights

@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SchemeGroup:
    """The experts of a stack whose projection uses one scheme.

    Invariants: ``experts`` are distinct expert indices in ascending order; ``w`` stacks their
    weights in that order, ``[n, K, N]`` in the format of ``scheme`` (an array for w16a16, else a
    ``QuantizedWeight`` or ``PackedWeight`` of that scheme), or for the FP model's gate_up a
    ``(gate, up)`` pair of ``[n, D, I]`` arrays.
    """

    w: Weight | tuple[jax.Array, jax.Array]
    experts: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    scheme: QScheme = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ExpertWeights:
    """A SwiGLU expert stack's weights grouped by scheme (module docstring).

    Invariants: the groups of each projection partition ``range(num_experts)``; ``gate_up``
    weights are ``[n, D, 2I]`` (gate columns ``[:I]``, up ``[I:]``) or a ``(gate, up)`` pair,
    ``down`` weights ``[n, I, D]``.
    """

    gate_up: tuple[SchemeGroup, ...]
    down: tuple[SchemeGroup, ...]
    num_experts: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def dense(cls, gate: jax.Array, up: jax.Array, down: jax.Array) -> ExpertWeights:
        """FP weights ``gate/up [E, D, I]``, ``down [E, I, D]`` as one w16a16 group each."""
        e = gate.shape[0]
        experts = tuple(range(e))
        return cls(gate_up=(SchemeGroup(w=(gate, up), experts=experts, scheme=W16A16),),
                   down=(SchemeGroup(w=down, experts=experts, scheme=W16A16),), num_experts=e)


def _matmul_padded(x_ecd: jax.Array, w: Weight) -> jax.Array:
    """``[n, C, K] x [n, K, N] -> [n, C, N]`` f32 at HIGHEST: the padded layout's reference
    (weights dequantized, weight-activation rows fake-quantized per token)."""
    scheme = weight_scheme(w)
    x = x_ecd.astype(jnp.float32)
    if not scheme.weight_only:
        x = fake_quant_activations(x, scheme)
    return jnp.einsum("eck,ekn->ecn", x, dequantize_weight(w).astype(jnp.float32), precision=_HI)


class SortedRows:
    """Rows sorted by expert (``group_sizes [E]``), the model's and the kernels' layout."""

    def __init__(self, group_sizes: jax.Array, num_rows: int, *, precision=None,
                 impl: str | None = None, first_expert: int = 0):
        self.group_sizes = group_sizes.astype(jnp.int32)
        self.first_expert = first_expert  # index of expert 0 in the hooks' numbering
        self.m = num_rows
        self.precision = precision
        self.impl = impl

    def expert_ids(self) -> jax.Array:
        return expert_of_row(self.group_sizes, self.m) + self.first_expert  # [M]

    def matmul(self, x, w, group_sizes):
        return grouped_matmul(x, w, group_sizes, out_dtype=jnp.float32,
                              precision=self.precision, impl=self.impl)

    def project(self, xs: tuple[jax.Array, ...], groups: tuple[SchemeGroup, ...],
                fn: Callable) -> jax.Array:
        """``fn(xs, w, group_sizes) -> [M, N]`` for one group; several groups (one input): one
        ``ops.grouped_matmul_by_scheme`` (one mixed-precision launch on the kernels)."""
        if len(groups) == 1:
            return fn(xs, groups[0].w, self.group_sizes)
        if len(xs) > 1 and xs[0] is not xs[1]:
            raise ValueError("hooks.act_quant: gate and up inputs differ, which needs one FP "
                             "group of separate gate and up weights")
        return grouped_matmul_by_scheme(xs[0], [(g.w, g.experts) for g in groups],
                                        self.group_sizes, out_dtype=jnp.float32,
                                        precision=self.precision, impl=self.impl)


class PaddedRows:
    """Rows padded per expert, ``[E, C, ·]`` (calibration's layout; f32, HIGHEST)."""

    def __init__(self, num_experts: int, capacity: int):
        self.e = num_experts
        self.c = capacity

    def expert_ids(self) -> jax.Array:
        return jnp.broadcast_to(jnp.arange(self.e, dtype=jnp.int32)[:, None], (self.e, self.c))

    def matmul(self, x, w, group_sizes):
        return _matmul_padded(x, w)

    def project(self, xs, groups, fn):
        if len(groups) == 1:
            return fn(xs, groups[0].w, None)
        out = None
        for g in groups:
            idx = np.asarray(g.experts)
            y = fn(tuple(x[idx] for x in xs), g.w, None)  # [n, C, N]
            if out is None:
                out = jnp.zeros((self.e, *y.shape[1:]), y.dtype)
            out = out.at[idx].set(y)
        return out


Rows = SortedRows | PaddedRows


@dataclass(frozen=True, kw_only=True)
class Hooks:
    """What a caller attaches to the forward (module docstring)."""

    # (rows entering block, block name "gate" | "up" | "down", expert index of each row) -> rows
    act_quant: Callable[[jax.Array, str, jax.Array], jax.Array] | None = None
    # filled at trace time with the forward's intermediates (a jitted caller returns it)
    capture: dict | None = None


def rotate_down_input(h: jax.Array, down_signs: jax.Array | None) -> jax.Array:
    """The online rotation of a down_proj input ``h [..., I]`` in f32 (identity without signs)."""
    if down_signs is None:
        return h
    return hadamard.rotate_right(h.astype(jnp.float32), down_signs.astype(jnp.float32), jnp)


def fusable(weights: ExpertWeights, hooks: Hooks | None) -> bool:
    """Whether a stack runs the fused path: fused gate_up weights and no hooks (which need the
    separate gate and up outputs)."""
    hooks = hooks or Hooks()
    return (hooks.act_quant is None and hooks.capture is None
            and not any(isinstance(grp.w, tuple) for grp in weights.gate_up))


def fused_swiglu(items, *, dtype) -> list[jax.Array]:
    """SwiGLU stacks in the sorted layout with the SwiGLU in the gate_up GEMM's epilogue, several
    stacks (``[(x, weights, rows, down_signs)]``, e.g. routed + shared experts) in one
    ``ops.grouped_matmuls`` per projection (one mixed-precision launch on the kernels).

    The same numbers as ``swiglu``'s unfused path: f32 ``silu(g) * u``, one rounding to ``dtype``
    (f32 kept for the online rotation), f32 outputs.
    """
    rows0 = items[0][2]
    rotated = any(signs is not None for *_, signs in items)
    kw = dict(precision=rows0.precision, impl=rows0.impl)
    hs = grouped_matmuls([(x, [(g.w, g.experts) for g in w.gate_up], rows.group_sizes)
                          for x, w, rows, _ in items],
                         out_dtype=jnp.float32 if rotated else dtype, epilogue="swiglu", **kw)
    hs = [rotate_down_input(h, signs).astype(dtype)
          for h, (*_, signs) in zip(hs, items, strict=True)]
    return grouped_matmuls([(h, [(g.w, g.experts) for g in w.down], rows.group_sizes)
                            for h, (_, w, rows, _) in zip(hs, items, strict=True)],
                           out_dtype=jnp.float32, **kw)


def swiglu(x: jax.Array, weights: ExpertWeights, rows: Rows, *, down_signs=None,
           hooks: Hooks | None = None, dtype=jnp.float32, capture_key: str = "routed"
           ) -> jax.Array:
    """SwiGLU experts on rows of either layout -> f32 output rows (``[M, D]`` or ``[E, C, D]``).

    ``x`` in the compute ``dtype`` (sorted) or f32 (padded). Rows past ``sum(group_sizes)`` give
    zeros (sorted layout).
    """
    hooks = hooks or Hooks()
    aq = hooks.act_quant
    ex = rows.expert_ids() if aq is not None else None
    xg = aq(x, "gate", ex) if aq is not None else x
    xu = aq(x, "up", ex) if aq is not None else x

    def gate_up(xs, w, gs):
        if isinstance(w, tuple):
            return jnp.concatenate([rows.matmul(xs[0], w[0], gs), rows.matmul(xs[1], w[1], gs)],
                                   axis=-1)
        if aq is not None:
            raise ValueError("hooks.act_quant: a fused gate_up weight has one input; attach the "
                             "hook to a model with separate gate and up weights (the FP model)")
        return rows.matmul(xs[0], w, gs)

    if isinstance(rows, SortedRows) and fusable(weights, hooks):
        return fused_swiglu([(x, weights, rows, down_signs)], dtype=dtype)[0]
    gu = rows.project((xg, xu), weights.gate_up, gate_up)  # [..., 2I] f32
    half = gu.shape[-1] // 2
    g, u = gu[..., :half], gu[..., half:]
    h = rotate_down_input(jax.nn.silu(g) * u, down_signs)  # f32
    h = h.astype(dtype)
    hd = aq(h, "down", ex) if aq is not None else h
    y = rows.project((hd,), weights.down, lambda xs, w, gs: rows.matmul(xs[0], w, gs))
    if hooks.capture is not None:
        hooks.capture[capture_key] = dict(x=x, g=g, u=u, h=h, y=y)
    return y


# ---------------------------------------------------------------------------------- modules

class RotationSigns(nnx.Variable):
    """The +-1 signs of an online Hadamard rotation (not a trained parameter)."""


class Experts(nnx.Module):
    """FP routed expert weights stacked per layer: ``gate/up [E, D, I]``, ``down [E, I, D]``."""

    def __init__(self, e: int, d: int, i: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 std: float = 0.02):
        init = nnx.initializers.normal(std)
        self.gate = nnx.Param(init(rngs.params(), (e, d, i), param_dtype))
        self.up = nnx.Param(init(rngs.params(), (e, d, i), param_dtype))
        self.down = nnx.Param(init(rngs.params(), (e, i, d), param_dtype))
        self.down_signs = nnx.data(None)  # RotationSigns [I] under an online down_proj rotation

    def weights(self) -> ExpertWeights:
        return ExpertWeights.dense(self.gate[...], self.up[...], self.down[...])


class MLP(nnx.Module):
    """The dense SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (dense layers, shared experts): a
    stack of one expert, run by the same ``swiglu`` as the routed experts."""

    def __init__(self, d: int, i: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.gate_proj = linear(d, i, **kw)
        self.up_proj = linear(d, i, **kw)
        self.down_proj = linear(i, d, **kw)
        self.down_signs = nnx.data(None)  # RotationSigns [I] under an online down_proj rotation

    def weights(self) -> ExpertWeights:
        return ExpertWeights.dense(self.gate_proj.kernel[...][None], self.up_proj.kernel[...][None],
                                   self.down_proj.kernel[...][None])

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense_swiglu(self, x, dtype=self.dtype).astype(self.dtype)


class QuantizedExperts(nnx.Module):
    """A SwiGLU stack whose weights are grouped by scheme (routed experts, shared expert or dense
    MLP), as ``quantize.apply`` builds it; ``__call__`` runs it on every row (a stack of one)."""

    def __init__(self, weights: ExpertWeights, *, dtype, down_signs=None):
        self.params = QuantizedParams(weights)
        self.dtype = dtype
        self.down_signs = nnx.data(None if down_signs is None else RotationSigns(down_signs))

    def weights(self) -> ExpertWeights:
        return self.params.get_value()

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense_swiglu(self, x, dtype=self.dtype).astype(self.dtype)


class QuantizedParams(nnx.Variable):
    """An ``ExpertWeights`` pytree (packed weights grouped by scheme)."""


def signs_of(stack) -> jax.Array | None:
    """A SwiGLU stack's online down_proj rotation signs, or None."""
    s = getattr(stack, "down_signs", None)
    return None if s is None else s[...]


def dense_swiglu(stack, x: jax.Array, *, dtype, hooks: Hooks | None = None,
                 capture_key: str = "dense", weights: ExpertWeights | None = None,
                 expert_index: int = 0, impl: str | None = None) -> jax.Array:
    """A stack of one expert (dense MLP, shared expert) on every row of ``x [..., D]`` -> f32.

    ``expert_index``: the stack's index in MxMoE's numbering, which the hooks see (a dense layer's
    MLP is 0, a shared expert ``E``).
    """
    shape = x.shape
    x_td = x.reshape(-1, shape[-1]).astype(dtype)
    rows = SortedRows(jnp.asarray([x_td.shape[0]], jnp.int32), x_td.shape[0],
                      precision=matmul_precision(dtype), impl=impl, first_expert=expert_index)
    y = swiglu(x_td, stack.weights() if weights is None else weights, rows,
               down_signs=signs_of(stack), hooks=hooks, dtype=dtype, capture_key=capture_key)
    return y.reshape(shape)


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
        return f32_logits(x_td, self.router.kernel[...])

    def shared_weight(self, x_td: jax.Array) -> jax.Array:
        """Per-token weight of the shared expert's output ``[T]`` f32: its sigmoid gate, or 1."""
        if not self.cfg.shared_expert_gate:
            return jnp.ones(x_td.shape[:1], jnp.float32)
        z = jnp.dot(x_td.astype(self.dtype), self.shared_gate.kernel[...].astype(self.dtype),
                    precision=matmul_precision(self.dtype))[:, 0]
        return jax.nn.sigmoid(z.astype(self.dtype)).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        out = moe_forward(self, x.reshape(-1, shape[-1]))
        return out.astype(self.dtype).reshape(shape)


def moe_forward(block: MoEBlock, x_td: jax.Array, *, layout: str = "sorted",
                capacity: int | None = None, routed: ExpertWeights | None = None,
                shared: ExpertWeights | None = None, hooks: Hooks | None = None,
                impl: str | None = None) -> jax.Array:
    """The MoE block on ``x [T, D]`` -> ``[T, D]`` f32 (routed experts + gated shared expert).

    ``layout``: ``"sorted"`` (the model's; in the block's dtype, ``grouped_matmul`` with ``impl``)
    or ``"padded"`` (calibration's: f32 at HIGHEST, groups of ``capacity`` rows, which must be
    >= the largest group). ``routed`` / ``shared`` replace the block's expert weights.
    """
    cfg = block.cfg
    hooks = hooks or Hooks()
    cap = hooks.capture
    routed = block.experts.weights() if routed is None else routed
    idx, weight = route(block.router_logits(x_td), cfg)
    if cap is not None:
        cap.update(topk_idx=idx, topk_weight=weight)
    has_shared = cfg.shared_intermediate_size > 0
    if layout == "sorted":
        dtype = block.dtype
        x_td = x_td.astype(dtype)
        d = dispatch(x_td, idx, cfg.num_experts)
        rows = SortedRows(d.group_sizes, d.x_sorted.shape[0],
                          precision=matmul_precision(dtype), impl=impl)
        shared = block.shared.weights() if has_shared and shared is None else shared
        if has_shared and fusable(routed, hooks) and fusable(shared, hooks):
            # the shared expert as a second job of the routed experts' launches
            shared_rows = SortedRows(jnp.asarray([x_td.shape[0]], jnp.int32), x_td.shape[0],
                                     precision=rows.precision, impl=impl,
                                     first_expert=cfg.num_experts)
            y, ys = fused_swiglu([(d.x_sorted, routed, rows, signs_of(block.experts)),
                                  (x_td, shared, shared_rows, signs_of(block.shared))],
                                 dtype=dtype)
            out = combine(y, d, weight)
            return out + block.shared_weight(x_td)[:, None] * ys
        y = swiglu(d.x_sorted, routed, rows, down_signs=signs_of(block.experts), hooks=hooks,
                   dtype=dtype)
        out = combine(y, d, weight)
        if cap is not None:
            cap["dispatch"] = d
    elif layout == "padded":
        if capacity is None:
            raise ValueError("capacity: the padded layout needs a static group capacity")
        dtype = jnp.float32
        groups = pad_groups(x_td, idx, weight, cfg.num_experts, capacity)
        y = swiglu(groups.x, routed, PaddedRows(cfg.num_experts, capacity),
                   down_signs=signs_of(block.experts), hooks=hooks, dtype=dtype)
        out = combine_groups(groups, y, x_td.shape[0])
        if cap is not None:
            cap["groups"] = groups
    else:
        raise ValueError(f"layout: {layout!r} is not 'sorted' or 'padded'")
    if has_shared:
        sw = block.shared_weight(x_td)  # [T] f32
        ys = dense_swiglu(block.shared, x_td, dtype=dtype, hooks=hooks, capture_key="shared",
                          weights=shared, expert_index=cfg.num_experts, impl=impl)
        out = out + sw[:, None] * ys.astype(jnp.float32)
        if cap is not None:
            cap["shared_weight"] = sw
    return out


def jitted_moe_forward(block: MoEBlock) -> tuple[Callable, nnx.State]:
    """``(f, state)``: ``f(x, state, routed=None, shared=None)`` is ``moe_forward(block, x, routed=,
    shared=)`` under ``jit`` with the block's and the replacement weights as ARGUMENTS.

    A function that closes over weights compiles them into the program as constants: a
    Qwen1.5-MoE layer's experts (~0.7 GB in bf16) made each compile take seconds to tens of seconds
    and the program as large as the weights. Call ``f`` under the ``ops.kernel_mode`` to time.
    """
    graphdef, state = nnx.split(block)

    def f(x, state, routed=None, shared=None):
        return moe_forward(nnx.merge(graphdef, state), x, routed=routed, shared=shared)

    return jax.jit(f), state
