"""The fake-quant forward: any per-(layer, expert, block) assignment of schemes in reference form.

The ground truth the kernels and the accuracy results are held to. Weights are quantized and
dequantized offline (``fake_quantize_params``: RTN, or codes from GPTQ); activations are
quantized and dequantized on the fly, per token, at the input of each expert block whose scheme has
``a_bits < 16`` (``quant_forward``). Experts are indexed as in MxMoE: routed experts ``0..E-1``,
the shared expert ``E``; in a dense layer the MLP is expert 0. Blocks are ``gate``, ``up``,
``down``. Only expert blocks are quantized (attention, router, shared gate, embeddings and head
stay as they are), as in the original.

``quant_forward`` composes the model's public pieces (``DecoderLayer.attention_residual``,
``route``, ``dispatch``, ``grouped_matmul``, ``combine``, ``MoECausalLM.logits``) rather than
hooking into ``MoEBlock``: it needs a different activation scheme per expert and per block (gate
and up may differ), and the online Hadamard rotation of every down_proj input, shared expert and
dense layers included. With no plan and no rotation it computes exactly what ``model(ids)`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.quant import hadamard
from mxmoe_jax.quant.act import fake_quant_activations
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import QScheme

BLOCKS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantPlan:
    """Scheme per ``(layer, expert, block)``; absent entries stay unquantized (full precision).

    Hashable (a tuple of items), so it can be a static argument of a jitted forward.
    """

    items: tuple[tuple[tuple[int, int, str], QScheme], ...]  # sorted ((layer, expert, block), s)

    @classmethod
    def from_mapping(cls, m: Mapping[tuple[int, int, str], QScheme | str]) -> QuantPlan:
        items = []
        for (layer, expert, block), s in m.items():
            if block not in BLOCKS:
                raise ValueError(f"block: {block!r} is not one of {BLOCKS}")
            items.append(((int(layer), int(expert), block), QScheme.parse(s)))
        return cls(items=tuple(sorted(items, key=lambda kv: kv[0])))

    @classmethod
    def uniform(cls, cfg, scheme: QScheme | str, *, shared: bool = True,
                dense: bool = False) -> QuantPlan:
        """Every routed expert block of every MoE layer (and the shared expert / dense MLPs)."""
        m = {}
        for layer in range(cfg.num_layers):
            if cfg.is_moe_layer(layer):
                experts = list(range(cfg.num_experts))
                if shared and cfg.shared_intermediate_size > 0:
                    experts.append(cfg.num_experts)
            else:
                experts = [0] if dense else []
            for e in experts:
                for b in BLOCKS:
                    m[(layer, e, b)] = scheme
        return cls.from_mapping(m)

    def as_dict(self) -> dict[tuple[int, int, str], QScheme]:
        return dict(self.items)

    def get(self, layer: int, expert: int, block: str) -> QScheme | None:
        return self.as_dict().get((layer, expert, block))


# -- weights -------------------------------------------------------------------------------------

def _block_keys(cfg, layer: int, expert: int) -> dict[str, tuple[str, int | None]]:
    """block -> (flat key, index into the stacked expert axis or None)."""
    p = f"layers/{layer}/mlp"
    if not cfg.is_moe_layer(layer):
        if expert != 0:
            raise ValueError(f"expert: dense layer {layer} has only expert 0, got {expert}")
        return {b: (f"{p}/{b}_proj/kernel", None) for b in BLOCKS}
    if expert == cfg.num_experts and cfg.shared_intermediate_size > 0:
        return {b: (f"{p}/shared/{b}_proj/kernel", None) for b in BLOCKS}
    if not 0 <= expert < cfg.num_experts:
        raise ValueError(f"expert: layer {layer} has experts 0..{cfg.num_experts - 1}"
                         + (f" and shared {cfg.num_experts}" if cfg.shared_intermediate_size
                            else "") + f", got {expert}")
    return {b: (f"{p}/experts/{b}", expert) for b in BLOCKS}


def fake_quantize_params(cfg, flat: Mapping[str, np.ndarray], plan: QuantPlan,
                         quantized: Mapping[tuple[int, int, str], QuantizedWeight] | None = None
                         ) -> dict[str, np.ndarray]:
    """Flat params with every planned block's weights replaced by their dequantized values.

    ``quantized`` supplies codes for some blocks (e.g. from GPTQ; their scheme must match the
    plan); the others are RTN-quantized. Arrays keep their dtypes (bf16 params get the
    dequantized values rounded to bf16).
    """
    out = dict(flat)
    copied: set[str] = set()  # stacked expert arrays are copied once, then written in place
    quantized = quantized or {}
    for (layer, expert, block), scheme in plan.items:
        key, idx = _block_keys(cfg, layer, expert)[block]
        if key not in out:
            raise ValueError(f"plan: {key} is not a parameter of this model")
        w = np.asarray(out[key] if idx is None else out[key][idx])
        qw = quantized.get((layer, expert, block))
        if qw is not None:
            if qw.scheme != scheme:
                raise ValueError(f"quantized[{(layer, expert, block)}]: scheme {qw.scheme} "
                                 f"but the plan says {scheme}")
            deq = np.asarray(dequantize(qw))
        else:
            deq = np.asarray(fake_quant_weight(jnp.asarray(w, jnp.float32), scheme))
        if deq.shape != w.shape:
            raise ValueError(f"{key}[{idx}]: quantized shape {deq.shape} != {w.shape}")
        if idx is None:
            out[key] = deq.astype(w.dtype)
        else:
            if key not in copied:
                out[key] = np.array(out[key])
                copied.add(key)
            out[key][idx] = deq.astype(w.dtype)
    return {k: np.asarray(v) for k, v in out.items()}


# -- activations ---------------------------------------------------------------------------------

def _rows_fq(x: jax.Array, expert_of_row: jax.Array, schemes: tuple) -> jax.Array:
    """Per-row activation fake-quant with expert ``e``'s scheme ``schemes[e]`` (None: untouched)."""
    out = x
    for s in sorted({s for s in schemes if s is not None and not s.weight_only}, key=str):
        sel = jnp.asarray([t == s for t in schemes])[expert_of_row]  # [M]
        out = jnp.where(sel[:, None], fake_quant_activations(x, s), out)
    return out


def _online(h: jax.Array, rotation, width: int) -> jax.Array:
    if rotation is None or rotation.down_signs(width) is None:
        return h
    y = hadamard.rotate_right(h.astype(jnp.float32), rotation.down_signs(width), jnp)
    return y.astype(h.dtype)


def _mlp(mlp, x: jax.Array, schemes: dict[str, QScheme | None], rotation) -> jax.Array:
    """A dense SwiGLU MLP module (dense layer or shared expert) with act fake-quant/rotation."""
    def fq(v, s):
        return v if s is None else fake_quant_activations(v, s)

    h = jax.nn.silu(mlp.gate_proj(fq(x, schemes["gate"]))) * mlp.up_proj(fq(x, schemes["up"]))
    h = _online(h, rotation, h.shape[-1])
    return mlp.down_proj(fq(h, schemes["down"]))


def _moe(block, y: jax.Array, layer: int, plan: dict, rotation) -> jax.Array:
    """``MoEBlock.__call__`` with per-expert activation fake-quant and the online rotation."""
    from mxmoe_jax.models.layers import matmul_precision
    from mxmoe_jax.models.moe import combine, dispatch, route
    from mxmoe_jax.ops import grouped_matmul

    cfg, dtype = block.cfg, block.dtype
    shape = y.shape
    x_td = y.reshape(-1, shape[-1]).astype(dtype)
    idx, weight = route(block.router_logits(x_td), cfg)
    d = dispatch(x_td, idx, cfg.num_experts)
    gs = d.group_sizes
    e = cfg.num_experts
    expert_of_row = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(gs), jnp.arange(d.x_sorted.shape[0]), side="right"), e - 1)
    per = {b: tuple(plan.get((layer, i, b)) for i in range(e)) for b in BLOCKS}
    prec = matmul_precision(dtype)
    x = d.x_sorted.astype(dtype)

    def gmm(v, w):
        return grouped_matmul(v, w.astype(dtype), gs, out_dtype=jnp.float32, precision=prec)

    g = gmm(_rows_fq(x, expert_of_row, per["gate"]), block.experts.gate[...])
    u = gmm(_rows_fq(x, expert_of_row, per["up"]), block.experts.up[...])
    hidden = (jax.nn.silu(g) * u).astype(dtype)  # [M, I]
    hidden = _online(hidden, rotation, hidden.shape[-1])
    out = combine(gmm(_rows_fq(hidden, expert_of_row, per["down"]), block.experts.down[...]),
                  d, weight)
    if cfg.shared_intermediate_size > 0:
        sh = _mlp(block.shared, x_td, {b: plan.get((layer, e, b)) for b in BLOCKS}, rotation)
        if cfg.shared_expert_gate:
            sh = jax.nn.sigmoid(block.shared_gate(x_td)) * sh
        out = out + sh.astype(jnp.float32)
    return out.astype(dtype).reshape(shape)


def quant_forward(model, input_ids: jax.Array, plan: QuantPlan | None = None,
                  rotation=None) -> jax.Array:
    """Logits ``[B, T, V]`` f32 of ``model`` (whose weights are already fake-quantized) with the
    plan's activation fake-quant and, given a ``rotation`` with ``online_down``, the online
    rotation of every down_proj input. Not jitted (see ``make_quant_forward``)."""
    pl = {} if plan is None else plan.as_dict()
    x = model.embed_tokens(input_ids)
    positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
    for i, layer in enumerate(model.layers):
        h = layer.attention_residual(x, positions)
        y = layer.post_attn_norm(h)
        if layer.is_moe:
            m = _moe(layer.mlp, y, i, pl, rotation)
        else:
            m = _mlp(layer.mlp, y, {b: pl.get((i, 0, b)) for b in BLOCKS}, rotation)
        x = h + m
    return model.logits(x)


def make_quant_forward(plan: QuantPlan | None = None, rotation=None):
    """A jitted ``f(model, ids) -> logits`` for a fixed plan and rotation."""

    @nnx.jit
    def f(model, input_ids):
        return quant_forward(model, input_ids, plan, rotation)

    return f
