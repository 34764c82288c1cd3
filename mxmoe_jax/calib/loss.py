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

The FP pass is not computed here: the one MoE forward (``models.moe.moe_forward`` in the padded
layout with ``Hooks(capture=...)``) captures each SwiGLU stack's block input ``x``, ``g``, ``u``,
the down input ``h`` and the output ``y``; `losses_sq` only computes what a quantized block
changes. Every stack has a leading expert axis: the routed experts' padded groups ``[E, C, ·]``,
the shared expert a stack of one ``[1, T, ·]``. Matmuls are f32 at HIGHEST, as the padded layout's.

Weight-activation schemes also fake-quantize the block's input rows (per token, dynamic): the
MoE block input for gate/up, ``silu(gate)·up`` for down (the original: a forward-pre-hook on the
linear). Squared norms are returned, so token chunks accumulate (``Δ = sqrt(Σ chunks)``).

Online Hadamard rotation (the stack's ``down_signs``, set by ``models.set_rotation``): the
captured ``h`` is already rotated, as the forward feeds it to the (pre-rotated) down weights and
to the down block's activation fake-quant; gate/up variants rotate their changed ``h`` the same
way (``models.moe.rotate_down_input``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from mxmoe_jax.models.moe import ExpertWeights, rotate_down_input
from mxmoe_jax.quant.act import fake_quant_activations
from mxmoe_jax.quant.scheme import QScheme

_HI = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MLPWeights:
    """SwiGLU weights of a stack of experts (routed experts ``[E]``, a shared expert ``[1]``), one
    array per block, or anything shaped like them per block (GPTQ's Hessians ``[E, K, K]``).

    Invariants: ``gate``/``up`` are ``[E, D, I]`` and ``down`` ``[E, I, D]`` (weights).
    """

    gate: jax.Array  # [E, D, I]
    up: jax.Array  # [E, D, I]
    down: jax.Array  # [E, I, D]

    def block(self, b: str) -> jax.Array:
        return getattr(self, b)

    @classmethod
    def of(cls, stack) -> MLPWeights:
        """The FP weights of a model's SwiGLU stack (``Experts`` or ``MLP``), f32."""
        w = stack.weights()
        if len(w.gate_up) != 1 or not isinstance(w.gate_up[0].w, tuple):
            raise ValueError("stack: calibration measures an FP stack (separate gate and up "
                             "weights), not a quantized one")
        gate, up = w.gate_up[0].w
        return cls(*(jnp.asarray(a, jnp.float32) for a in (gate, up, w.down[0].w)))

    def expert_weights(self) -> ExpertWeights:
        """The same weights as the forward takes them (one w16a16 group per projection)."""
        return ExpertWeights.dense(self.gate, self.up, self.down)


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


def block_supported(scheme: QScheme, k: int) -> bool:
    """Can ``scheme`` quantize a block with ``k`` input features (weight and activation groups)?"""
    return scheme.w_bits == 16 or scheme.group_size == -1 or k % scheme.group_size == 0


def act_quant(x: jax.Array, scheme: QScheme | None) -> jax.Array:
    """The block input rows as a weight-activation ``scheme`` sees them (identity: weight-only)."""
    return x if scheme is None or scheme.weight_only else fake_quant_activations(x, scheme)


def _mm(x_eck: jax.Array, w_ekn: jax.Array) -> jax.Array:
    return jnp.einsum("eck,ekn->ecn", x_eck, w_ekn.astype(jnp.float32), precision=_HI)


def _sq_rows(a: jax.Array, b: jax.Array) -> jax.Array:
    """``||a − b||²`` over the last axis, f32."""
    d = a - b
    return jnp.sum(d * d, axis=-1)


def losses_sq(part: Mapping[str, jax.Array], row_w: jax.Array, down_w: jax.Array,
              variants: Sequence[QuantizedBlocks], *, down_signs: jax.Array | None = None
              ) -> jax.Array:
    """Squared Δ of each block for each scheme, summed over rows: ``[S, E, 3]`` f32.

    ``part``: one stack's capture of the FP forward, ``x``, ``g``, ``u``, ``h`` (rotated online
    under ``down_signs``) and ``y``, each ``[E, C, ·]`` f32 (C rows per expert); ``row_w [E, C]``
    the weight of each row in the layer output (0 for padding); ``down_w [E, I, D]`` the FP down
    weights, which the gate/up variants' changed ``h`` meets.
    """
    x, g, u, h, y = (part[k].astype(jnp.float32) for k in ("x", "g", "u", "h", "y"))

    def down(hq):  # FP down_proj of a changed (unrotated) down input
        return _mm(rotate_down_input(hq, down_signs), down_w)

    w2 = jnp.square(row_w.astype(jnp.float32))

    def delta_sq(yq):  # [E]
        return jnp.sum(_sq_rows(yq, y) * w2, axis=-1)

    zero = jnp.zeros(w2.shape[:-1], jnp.float32)
    out = []
    for v in variants:
        xa = act_quant(x, v.scheme) if (v.gate is not None or v.up is not None) else None
        cols = [
            zero if v.gate is None else delta_sq(down(jax.nn.silu(_mm(xa, v.gate)) * u)),
            zero if v.up is None else delta_sq(down(jax.nn.silu(g) * _mm(xa, v.up))),
            zero if v.down is None else delta_sq(_mm(act_quant(h, v.scheme), v.down)),
        ]
        out.append(jnp.stack(cols, axis=-1))
    return jnp.stack(out)


__all__ = ["MLPWeights", "QuantizedBlocks", "act_quant", "block_supported", "losses_sq"]
