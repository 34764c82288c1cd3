"""Standard GQA attention (qwen2_moe, qwen3_moe, mixtral, olmoe) and the shared attention core.

Call signature shared with DeepSeek-V2's ``mla.MLAttention`` (the model picks one per family)::

    Attention(cfg: ModelConfig, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs)
    attn(x [B, T, D], positions [B, T] or [T] int) -> [B, T, D]   (dtype = the module's dtype)

Causal (and, where ``cfg.layer_sliding_window(layer_idx)`` is set, sliding-window) masking is by
token index within the sequence: key s is visible to query t iff ``s <= t`` and, with a window W,
``s > t - W`` (transformers' ``sliding_window_overlay``). No KV cache: this is a scoring model.

Per family (transformers' ``modeling_<family>.py``): optional q/k/v bias (qwen2_moe ``qkv_bias``,
others ``attention_bias``, which also biases o_proj in qwen3_moe/olmoe); q/k RMSNorm per head
before RoPE (qwen3_moe, ``qk_norm="head"``) or over the whole projection (olmoe, ``"full"``),
then olmoe's optional ``clip_qkv`` clamp; RoPE in the rotate_half layout; softmax in f32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models.layers import (
    RMSNorm,
    apply_rope,
    default_inv_freq,
    linear,
    matmul_precision,
    positions_bt,
    rope_cos_sin,
)


def causal_mask(t: int, window: int | None = None) -> jax.Array:
    """``[T, T]`` bool, True where query t may attend key s."""
    q = jnp.arange(t)[:, None]
    s = jnp.arange(t)[None, :]
    mask = s <= q
    if window is not None:
        mask = mask & (s > q - window)
    return mask


def attention_core(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, *, scale: float,
                   window: int | None = None) -> jax.Array:
    """Masked softmax attention with GQA: q ``[B,T,H,dq]``, k ``[B,S,KV,dq]``, v ``[B,S,KV,dv]``.

    Scores accumulate in f32 and the softmax runs in f32; probabilities are cast to the value
    dtype before the value matmul (as transformers' eager path). Returns ``[B, T, H, dv]``.
    """
    b, t, h, _ = q_bthd.shape
    kv = k_bskd.shape[2]
    g = h // kv
    prec = matmul_precision(q_bthd.dtype)
    q = q_bthd.reshape(b, t, kv, g, q_bthd.shape[-1])
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd, precision=prec,
                        preferred_element_type=jnp.float32) * scale  # [B, KV, G, T, S] f32
    mask = causal_mask(t, window)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd, precision=prec,
                     preferred_element_type=jnp.float32)  # [B, T, KV, G, dv] f32
    return out.reshape(b, t, h, v_bskd.shape[-1]).astype(v_bskd.dtype)


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional q/k norm, RoPE and sliding window."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.rope_scaling is not None:
            rope_type = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
            raise ValueError(f"{cfg.model_type}: rope type {rope_type!r} is not supported by the "
                             "standard attention (only the default rope)")
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = hd = cfg.head_dim
        self.qk_norm = cfg.qk_norm
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.layer_sliding_window(layer_idx)
        self.rope_theta = cfg.rope_theta
        self.dtype = dtype
        d, h, kv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, h * hd, bias=cfg.attention_bias, **kw)
        self.k_proj = linear(d, kv * hd, bias=cfg.attention_bias, **kw)
        self.v_proj = linear(d, kv * hd, bias=cfg.attention_bias, **kw)
        self.o_proj = linear(h * hd, d, bias=cfg.o_proj_bias, **kw)
        nkw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(hd, **nkw)
            self.k_norm = RMSNorm(hd, **nkw)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(h * hd, **nkw)
            self.k_norm = RMSNorm(kv * hd, **nkw)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        x = x.astype(self.dtype)
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, *]
        if self.qk_norm == "full":  # olmoe: over all heads' width, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
        q = q.reshape(b, t, h, hd)
        k = k.reshape(b, t, kv, hd)
        v = v.reshape(b, t, kv, hd)
        if self.qk_norm == "head":  # qwen3: per head, over head_dim
            q, k = self.q_norm(q), self.k_norm(k)
        pos = positions_bt(positions, b)
        cos, sin = rope_cos_sin(pos, default_inv_freq(hd, self.rope_theta), dtype=x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention_core(q, k, v, scale=1.0 / math.sqrt(hd), window=self.window)
        return self.o_proj(out.reshape(b, t, h * hd))
