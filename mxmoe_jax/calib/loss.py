"""Per-block quantization loss of one MoE layer, all experts at once (the calibration shortcut).

MxMoE's ``layer_out_norm`` [code, §1.2 of the fact sheet] quantizes one linear block ``b`` (gate, up
or down) of one expert ``e``, reruns the decoder layer on the FP inputs and takes
``Δ = ||Ô − O||_F`` over every calibration token. Only expert ``e``'s weights change and the
router sees the same input, so the layer output changes only on the tokens routed to ``e``, by
their routing weight times the change of that expert's output::

    Δ²(e, b) = Σ_t (w_te · ||y_e,b(t) − y_e(t)||)²

(the shared expert: every token, weighted by its sigmoid gate on qwen2_moe, else 1). Quantizing
block ``b`` of *every* expert at once therefore gives every expert's own Δ in one pass: the rows
of expert ``e`` only ever meet expert ``e``'s weights. One batched matmul per changed block
replaces the original's one layer pass per (expert, block).

Layout: the tokens routed to each expert are gathered into padded groups ``[E, C, D]`` (capacity
``C`` >= the largest group, padding rows carry weight 0), so every expert matmul is one dense
batched einsum (``'ecd,edi->eci'``): fast on every backend, where a ragged matmul on the CPU is
~20x slower than the dense one. The capacity is chosen on the host from the routing
(`capacity_for`), rounded up to a few sizes per octave so jit compiles only a handful of shapes.

Weight-activation schemes also fake-quantize the block's input rows (per token, dynamic): the
MoE block input for gate/up, ``silu(gate)·up`` for down (the original: a forward-pre-hook on the
linear). Squared norms are returned, so token chunks accumulate (``Δ = sqrt(Σ chunks)``).

Online Hadamard rotation (``down_signs``, the model rotated with ``online_down``): every down_proj
input ``h = silu(g)·u`` is rotated, ``h Q_I`` with ``Q_I = diag(s) H_I / sqrt(I)``, before the
(pre-rotated) down weights and before the down block's activation fake-quant, as
``fakequant.quant_forward`` does; gate/up variants rotate their changed ``h`` the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mxmoe_jax.quant import hadamard
from mxmoe_jax.quant.act import fake_quant_activations
from mxmoe_jax.quant.scheme import QScheme

BLOCKS = ("gate", "up", "down")
_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLPWeights:
    """SwiGLU weights of a stack of routed experts or of one dense (shared) expert.

    Invariants: ``gate``/``up`` are ``[..., D, I]`` and ``down`` ``[..., I, D]`` with the same
    leading axes (``[E]`` for routed experts, none for the shared expert).
    """

    gate: jax.Array  # [..., D, I]
    up: jax.Array  # [..., D, I]
    down: jax.Array  # [..., I, D]

    def block(self, b: str) -> jax.Array:
        return getattr(self, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedBlocks:
    """One scheme's fake-quantized (dequantized, f32) weights for each block of an `MLPWeights`,
    or None where the scheme cannot quantize that block (``group_size`` does not divide its K).

    ``scheme`` is static: it selects the activation fake-quant (identity when a_bits = 16).
    """

    gate: jax.Array | None  # like MLPWeights.gate, f32
    up: jax.Array | None
    down: jax.Array | None
    scheme: QScheme = dataclasses.field(metadata=dict(static=True))

    def block(self, b: str) -> jax.Array | None:
        return getattr(self, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Groups:
    """The (token, slot) pairs of a token chunk gathered per expert into padded groups.

    Invariants: slot ``[e, c]`` for ``c < group_sizes[e]`` holds the c-th token (in token order)
    routed to expert e: ``x[e, c] = x_td[token[e, c]]`` and ``weight[e, c]`` its routing weight
    (times the token mask); padding slots have ``x = 0``, ``weight = 0``, ``token = 0``.
    """

    x: jax.Array  # [E, C, D] f32
    weight: jax.Array  # [E, C] f32
    token: jax.Array  # [E, C] int32
    valid: jax.Array  # [E, C] bool (real slot, even if its weight is 0)


def block_supported(scheme: QScheme, k: int) -> bool:
    """Can ``scheme`` quantize a block with ``k`` input features (weight and activation groups)?"""
    return scheme.w_bits == 16 or scheme.group_size == -1 or k % scheme.group_size == 0


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


def _act(x: jax.Array, scheme: QScheme | None) -> jax.Array:
    return x if scheme is None or scheme.weight_only else fake_quant_activations(x, scheme)


def _bmm(x_ecd: jax.Array, w_edi: jax.Array) -> jax.Array:
    return jnp.einsum("ecd,edi->eci", x_ecd, w_edi.astype(jnp.float32), precision=_HI)


def _mm(x_td: jax.Array, w_di: jax.Array) -> jax.Array:
    return jnp.dot(x_td, w_di.astype(jnp.float32), precision=_HI)


def _sq_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """``||a − b||²`` over the last axis, f32."""
    d = a - b
    return jnp.sum(d * d, axis=-1)


def rotate_down_input(h: jax.Array, down_signs: jax.Array | None) -> jax.Array:
    """The online rotation of a down_proj input ``h [..., I]`` (identity when ``down_signs`` is
    None): ``h Q_I`` in f32, the same call as ``fakequant``'s."""
    if down_signs is None:
        return h
    return hadamard.rotate_right(h.astype(jnp.float32), down_signs, jnp)


def swiglu_parts(x: jax.Array, w: MLPWeights, mm, down_signs: jax.Array | None = None
                 ) -> tuple[jax.Array, ...]:
    """FP ``(g, u, h, y)`` of a SwiGLU MLP with matmul ``mm`` (batched or dense): ``h`` is the
    down_proj input ``silu(g)·u``, rotated online when ``down_signs`` is given."""
    g = mm(x, w.gate)
    u = mm(x, w.up)
    h = rotate_down_input(jax.nn.silu(g) * u, down_signs)
    return g, u, h, mm(h, w.down)


def losses_sq(x: jax.Array, row_w: jax.Array, w: MLPWeights, variants: Sequence[QuantizedBlocks],
              *, batched: bool, down_signs: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """Squared Δ of each block for each scheme, summed over rows, and the FP output.

    ``x`` rows ``[E, C, D]`` (``batched``: routed experts) or ``[T, D]`` (the shared expert),
    ``row_w`` the weight of each row (``[E, C]`` or ``[T]``; 0 for padding), ``down_signs`` the
    online rotation of the down_proj input (None: none). Returns (``[S, E, 3]`` or ``[S, 3]``
    f32, the FP expert output ``y``).
    """
    mm = _bmm if batched else _mm
    x = x.astype(jnp.float32)
    g, u, h, y = swiglu_parts(x, w, mm, down_signs)

    def down(hq):  # FP down_proj of a changed (unrotated) down input
        return mm(rotate_down_input(hq, down_signs), w.down)

    w2 = jnp.square(row_w.astype(jnp.float32))
    reduce_axes = -1  # sum over rows: C (batched) or T

    def delta_sq(yq):
        return jnp.sum(_sq_rows(yq, y) * w2, axis=reduce_axes)

    zero = jnp.zeros(w2.shape[:-1], jnp.float32)
    out = []
    for v in variants:
        xa = _act(x, v.scheme) if (v.gate is not None or v.up is not None) else None
        cols = [
            zero if v.gate is None else delta_sq(down(jax.nn.silu(mm(xa, v.gate)) * u)),
            zero if v.up is None else delta_sq(down(jax.nn.silu(g) * mm(xa, v.up))),
            zero if v.down is None else delta_sq(mm(_act(h, v.scheme), v.down)),
        ]
        out.append(jnp.stack(cols, axis=-1))
    return jnp.stack(out), y


def combine_groups(groups: Groups, y_ecd: jax.Array, num_tokens: int) -> jax.Array:
    """The routed experts' weighted sum per token ``[T, D]`` f32 from per-group outputs."""
    contrib = y_ecd * groups.weight[..., None]
    return jnp.zeros((num_tokens, y_ecd.shape[-1]), jnp.float32).at[groups.token].add(contrib)


def selected_mlp(x: jax.Array, w: MLPWeights, q: QuantizedBlocks, block: jax.Array,
                 rows: jax.Array, *, batched: bool, down_signs: jax.Array | None = None
                 ) -> jax.Array:
    """The MLP output with exactly one block quantized: ``block`` (traced int, 0 gate, 1 up,
    2 down; anything else: none) in the rows/experts where ``rows`` is True (``[E, C]`` or [T]);
    ``down_signs``: the online rotation of the down_proj input (None: none).

    Weights are per-expert, so ``rows`` for a routed expert e is ``valid & (expert == e)``; the
    quantized weights of the other experts never meet a selected row. Used by the brute-force
    ``model_out_norm`` metric; ``q`` blocks that are None are never selected.
    """
    mm = _bmm if batched else _mm
    x = x.astype(jnp.float32)
    sel = rows[..., None]

    def blk(i, name, a):
        wq = q.block(name)
        y = mm(a, w.block(name))
        if wq is None:
            return y
        yq = mm(_act(a, q.scheme), wq)
        return jnp.where(sel & (block == i), yq, y)

    h = rotate_down_input(jax.nn.silu(blk(0, "gate", x)) * blk(1, "up", x), down_signs)
    return blk(2, "down", h)
