"""``MoECausalLM``: embeddings, decoder layers (attention + MLP or MoE), final norm, LM head.

Parameter paths (NNX state, "/"-joined as flat keys; linear kernels are ``[in, out]``)::

    embed/embedding [V, D]
    layers/{i}/input_norm/scale, layers/{i}/post_attn_norm/scale [D]
    layers/{i}/attn/...            standard attention (attention.py) or MLA (mla.py)
    layers/{i}/mlp/gate_proj|up_proj|down_proj/kernel          dense layers
    layers/{i}/mlp/router/kernel [D, E]; mlp/experts/gate|up [E, D, I], down [E, I, D];
    layers/{i}/mlp/shared/{gate,up,down}_proj/kernel; mlp/shared_gate/kernel [D, 1]
    final_norm/scale [D]; lm_head/kernel [D, V] (absent when tie_word_embeddings)

``forward(model, ids)`` is the jitted ``model(ids)``; ``forward_hidden`` also returns the MoE-block
inputs of chosen layers (calibration); ``param_shapes``, ``from_flat_params`` and
``to_flat_params`` let conversion and checkpoints work on flat dicts without NNX internals.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models.attention import Attention
from mxmoe_jax.models.layers import RMSNorm, linear, matmul_precision
from mxmoe_jax.models.moe import MLP, MoEBlock, RotationSigns
from mxmoe_jax.ops import weight_shape


def make_attention(cfg: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    """The family's attention module (MLA for deepseek_v2, else the standard GQA attention)."""
    if cfg.model_type == "deepseek_v2":
        from mxmoe_jax.models import mla  # lazy: written in parallel, only DS2 needs it

        return mla.MLAttention(cfg, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return Attention(cfg, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + mlp(norm(h))``."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.layer_idx = layer_idx
        self.is_moe = cfg.is_moe_layer(layer_idx)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.attn = make_attention(cfg, layer_idx, rngs=rngs, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        if self.is_moe:
            self.mlp = MoEBlock(cfg, rngs=rngs, **kw)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, **kw)

    def attention_residual(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """``x + attn(input_norm(x))``: the hidden state entering the post-attention norm."""
        return x + self.attn(self.input_norm(x), positions)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        h = self.attention_residual(x, positions)
        return h + self.mlp(self.post_attn_norm(h))  # the loop in MoECausalLM.hidden inlines this


class MoECausalLM(nnx.Module):
    """An MoE decoder-only LM: ``__call__(input_ids [B, T] int32) -> logits [B, T, V] f32``."""

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02), **kw)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs, **kw)
                                for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, bias=False, rngs=rngs, **kw)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """``[B, T] -> [B, T, D]`` in the model dtype."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        return self.embed(input_ids).astype(self.dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and LM head: ``[B, T, D] -> [B, T, V]`` f32."""
        h = self.final_norm(h)
        w = self.embed.embedding[...].T if self.cfg.tie_word_embeddings \
            else self.lm_head.kernel[...]  # [D, V]
        return jnp.dot(h, w.astype(h.dtype), precision=matmul_precision(self.dtype),
                       preferred_element_type=jnp.float32)

    def hidden(self, input_ids: jax.Array, *, capture: tuple[int, ...] = (),
               last: int | None = None) -> tuple[jax.Array, dict[int, jax.Array]]:
        """The decoder loop: the hidden state after layer ``last`` (default: the last layer)
        ``[B, T, D]`` and the MLP / MoE-block input of each layer in ``capture``."""
        x = self.embed_tokens(input_ids)
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)
        last = len(self.layers) - 1 if last is None else last
        captured = {}
        for i, layer in enumerate(self.layers):
            if i > last:
                break  # nothing after the last needed layer is computed
            h = layer.attention_residual(x, positions)
            mlp_in = layer.post_attn_norm(h)
            if i in capture:
                captured[i] = mlp_in
            x = h + layer.mlp(mlp_in)
        return x, captured

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.logits(self.hidden(input_ids)[0])


@nnx.jit
def attention_part(layer: DecoderLayer, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Jitted ``(h, xn)`` of one layer on ``x [B, T, D]``: the residual stream after attention and
    the MLP input ``post_attn_norm(h)`` (positions ``0..T-1``). Layer-by-layer walks (calibration,
    GPTQ) run the MLP part themselves."""
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)
    h = layer.attention_residual(x, positions)
    return h, layer.post_attn_norm(h)


@nnx.jit
def forward(model: MoECausalLM, input_ids: jax.Array) -> jax.Array:
    """Jitted ``model(input_ids)``: ``[B, T] int32 -> [B, T, V] f32``."""
    return model(input_ids)


@partial(nnx.jit, static_argnames=("capture", "with_logits"))
def _forward_hidden(model: MoECausalLM, input_ids: jax.Array, *, capture: tuple[int, ...],
                    with_logits: bool):
    last = max(capture, default=-1) if not with_logits else model.cfg.num_layers - 1
    x, captured = model.hidden(input_ids, capture=capture, last=last)
    return (model.logits(x) if with_logits else None), captured


def forward_hidden(model: MoECausalLM, input_ids: jax.Array, *,
                   capture: Iterable[int] | None = None,
                   with_logits: bool = True) -> tuple[jax.Array | None, dict[int, jax.Array]]:
    """Jitted forward that also returns each requested layer's MLP / MoE-block input.

    ``capture``: layer indices (default: every MoE layer). The captured value of layer i is
    ``post_attn_norm(x + attn(input_norm(x)))`` ``[B, T, D]`` in the model dtype: exactly what
    ``model.layers[i].mlp`` receives, so ``model.layers[i].mlp(captured[i])`` reproduces the
    block's output (and ``mlp.routed`` / ``moe.route`` its pieces). With ``with_logits=False``
    the layers after the last captured one are skipped and logits are None.
    """
    cfg = model.cfg
    layers = cfg.moe_layers if capture is None else tuple(sorted({int(i) for i in capture}))
    bad = [i for i in layers if not 0 <= i < cfg.num_layers]
    if bad:
        raise ValueError(f"capture: layer indices {bad} outside 0..{cfg.num_layers - 1}")
    return _forward_hidden(model, input_ids, capture=layers, with_logits=with_logits)


def swiglu_stacks(model: MoECausalLM):
    """``(layer, expert index, stack)`` of every SwiGLU stack: a MoE layer's routed experts
    (index None), its shared expert (index E), a dense layer's MLP (index 0)."""
    for i, layer in enumerate(model.layers):
        mlp = layer.mlp
        if layer.is_moe:
            yield i, None, mlp.experts
            if hasattr(mlp, "shared"):
                yield i, model.cfg.num_experts, mlp.shared
        else:
            yield i, 0, mlp


def set_rotation(model: MoECausalLM, rotation) -> MoECausalLM:
    """Turn on the online down_proj rotation of ``rotation`` (a ``quant.rotation.Rotation``
    whose ``rotate_params`` produced the model's weights) in every SwiGLU stack; in place."""
    for _, _, stack in swiglu_stacks(model):
        width = weight_shape(stack.weights().down[0].w)[1]  # down's K = I
        signs = None if rotation is None else rotation.down_signs(width)
        stack.down_signs = None if signs is None else RotationSigns(
            jnp.asarray(signs, jnp.float32))
    return model


def online_rotation_widths(model: MoECausalLM) -> list[int]:
    """The widths whose down_proj inputs the model rotates online (empty: no rotation)."""
    return sorted({int(s.down_signs[...].shape[0]) for _, _, s in swiglu_stacks(model)
                   if getattr(s, "down_signs", None) is not None})


# ------------------------------------------------------------------------------ flat params

def _key(path) -> str:
    return "/".join(str(p) for p in path)


def _abstract(cfg: ModelConfig, dtype=jnp.float32) -> MoECausalLM:
    return nnx.eval_shape(lambda: MoECausalLM(cfg, dtype=dtype, param_dtype=dtype,
                                              rngs=nnx.Rngs(0)))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every parameter, from ``cfg`` alone (nothing is allocated)."""
    state = nnx.state(_abstract(cfg), nnx.Param)
    return {_key(path): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def to_flat_params(model: MoECausalLM) -> dict[str, np.ndarray]:
    """Flat key -> host array of every parameter (bf16 stays ml_dtypes.bfloat16)."""
    state = nnx.state(model, nnx.Param)
    return {_key(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def from_flat_params(cfg: ModelConfig, flat: Mapping[str, jax.Array | np.ndarray],
                     dtype=jnp.float32) -> MoECausalLM:
    """Build a model whose params (and compute dtype) are ``dtype`` from a flat dict.

    Every key of ``param_shapes(cfg)`` must be present with that shape, and no other key: a
    ValueError lists the missing, unexpected or mis-shaped keys.
    """
    model = _abstract(cfg, dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat_state = nnx.to_flat_state(params)
    expected = {_key(path): tuple(v.shape) for path, v in flat_state}
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    bad = sorted(f"{k}: got {tuple(np.shape(flat[k]))}, want {expected[k]}"
                 for k in expected.keys() & flat.keys() if tuple(np.shape(flat[k])) != expected[k])
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if bad:
            parts.append(f"wrong shape {bad}")
        raise ValueError(f"{cfg.model_type} params do not match the config: " + "; ".join(parts))
    leaves = []
    for path, v in flat_state:
        leaves.append((path, v.replace(jnp.asarray(flat[_key(path)], dtype=dtype))))
    params = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, params, rest)
