"""DeepSeek-V2 multi-head latent attention (MLA) with interleaved RoPE and YaRN, in Flax NNX.

MLA (DeepSeek-V2, arXiv 2405.04434 §2.1) compresses keys and values into one latent per token:

    q       = q_proj(x)                                  (q_lora_rank None: DeepSeek-V2-Lite)
            | q_b_proj(q_a_norm(q_a_proj(x)))            (q_lora_rank set: DeepSeek-V2)
    [c, kr] = kv_a_proj(x)                  c: kv_lora_rank latent, kr: one rope key for all heads
    [kn, v] = kv_b_proj(kv_a_norm(c))       per head: kn [qk_nope_head_dim], v [v_head_dim]
    score_h = [qn_h, rope(qr_h)] . [kn_h, rope(kr)] * softmax_scale

Shapes use b batch, t position, h head, d = qk_nope_head_dim, r = qk_rope_head_dim,
v = v_head_dim. The masked softmax is the standard attention's ``attention_core`` (causal by
token index, f32 scores and softmax), with the one rope key broadcast to every head.

Transformers' DeepSeek-V2 (5.x) applies RoPE in complex form to *adjacent* pairs
``(x[2i], x[2i+1])`` (``view_as_complex``), not to the two halves as Llama does, and multiplies
cos/sin by YaRN's ``attention_factor``, so the rope part of a score carries that factor squared.
The softmax scale is ``qk_head_dim**-0.5 * mscale**2`` with
``mscale = 0.1 * mscale_all_dim * ln(factor) + 1`` whenever the rope type is not "default" and
``mscale_all_dim`` is set (DeepSeek-V2-Lite: factor 40, mscale_all_dim 0.707). The YaRN inverse
frequencies follow ``transformers.modeling_rope_utils._compute_yarn_parameters`` step by step in
float32 so that our positions are rotated by the same angles as transformers'.

``q_a_norm`` and ``kv_a_norm`` use eps 1e-6 whatever ``rms_norm_eps`` says: transformers (and the
original DeepSeek code) build them with the RMSNorm default.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models.attention import attention_core
from mxmoe_jax.models.layers import RMSNorm, linear, positions_bt

# transformers builds q_a_layernorm / kv_a_layernorm without passing rms_norm_eps
LATENT_NORM_EPS = 1e-6

_SUPPORTED_ROPE = ("default", "yarn")


def rope_parameters(cfg: ModelConfig) -> dict:
    """The rope dict of ``cfg`` in transformers 5 form: ``rope_type`` and ``rope_theta`` always set.

    Accepts both hub spellings (old ``rope_scaling: {"type": "yarn", ...}`` beside a top-level
    ``rope_theta``; transformers 5's ``rope_parameters: {"rope_type": ..., "rope_theta": ...}``).
    """
    params = dict(cfg.rope_scaling or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE:
        raise ValueError(
            f"rope_scaling: rope type {rope_type!r} is not supported for deepseek_v2 "
            f"(supported: {', '.join(_SUPPORTED_ROPE)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope_scaling: partial_rotary_factor != 1 is not supported for MLA")
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", cfg.rope_theta)
    if params["rope_theta"] is None:
        raise ValueError("rope_theta: missing from the config and from its rope parameters")
    if rope_type == "yarn":
        max_pos = int(cfg.max_position_embeddings)
        # transformers' standardize_rope_params: the pretraining length defaults to the model's
        params.setdefault("original_max_position_embeddings", max_pos)
        if params.get("factor") is None:
            # DeepSeek-V3 style configs give the lengths instead of the factor
            params["factor"] = max_pos / params["original_max_position_embeddings"]
    return params


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(*, dim: int, base: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  truncate: bool = True) -> np.ndarray:
    """YaRN inverse frequencies [dim // 2] float32, as transformers computes them.

    Dimensions that rotate more than ``beta_fast`` times over the original context keep their
    frequency (extrapolation), those rotating fewer than ``beta_slow`` times are divided by
    ``factor`` (interpolation), and a linear ramp over the dimension index blends in between
    (YaRN, arXiv 2309.00071 §3.2, "NTK-by-parts").
    """
    def correction_dim(num_rotations: float) -> float:
        # the dimension index whose wavelength fits num_rotations times in the original context
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp

    # float32 throughout, in transformers' order of operations
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_freq_extrapolation = np.float32(1.0) / pos_freqs
    inv_freq_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
    extrapolation_factor = np.float32(1.0) - ramp
    inv_freq = (inv_freq_interpolation * (np.float32(1.0) - extrapolation_factor)
                + inv_freq_extrapolation * extrapolation_factor)
    return inv_freq.astype(np.float32)


def mla_rope(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [qk_rope_head_dim // 2] float32, attention_factor) for ``cfg``."""
    params = rope_parameters(cfg)
    dim = cfg.qk_rope_head_dim
    base = float(params["rope_theta"])
    if params["rope_type"] == "default":
        inv_freq = np.float32(1.0) / (
            np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
        return inv_freq.astype(np.float32), 1.0
    factor = float(params["factor"])
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor,
                                                                                  mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    inv_freq = yarn_inv_freq(
        dim=dim, base=base, factor=factor,
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)))
    return inv_freq, float(attention_factor)


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """``qk_head_dim**-0.5``, times YaRN's ``mscale(factor, mscale_all_dim)**2`` when scaled."""
    params = rope_parameters(cfg)
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    mscale_all_dim = params.get("mscale_all_dim", 0)
    if params["rope_type"] != "default" and mscale_all_dim:
        m = yarn_get_mscale(float(params["factor"]), mscale_all_dim)
        scale = scale * m * m
    return scale


def apply_interleaved_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs ``(x[..., 2i], x[..., 2i+1])`` by angle i (complex multiplication).

    ``x`` [..., r]; ``cos``/``sin`` broadcast against [..., r // 2] (already times the
    attention factor). Computed in f32 and cast back, as transformers does.
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class MLAttention(nnx.Module):
    """DeepSeek-V2 multi-head latent attention, causal, no KV cache (prefill / scoring only).

    Parameters (NNX paths, kernels [in, out]): ``q_proj`` [D, H*(d+r)] or ``q_a_proj`` [D, qr] +
    ``q_a_norm`` [qr] + ``q_b_proj`` [qr, H*(d+r)]; ``kv_a_proj`` [D, kvr+r]; ``kv_a_norm``
    [kvr]; ``kv_b_proj`` [kvr, H*(d+v)]; ``o_proj`` [H*v, D]. With ``attention_bias``,
    ``q_a_proj``, ``kv_a_proj`` and ``o_proj`` carry a bias (as in transformers).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not getattr(cfg, field, None) or getattr(cfg, field) <= 0:
                raise ValueError(f"{field}: MLA needs a positive value, got "
                                 f"{getattr(cfg, field, None)!r}")
        if cfg.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: must be even for RoPE, got {cfg.qk_rope_head_dim}")
        if cfg.q_lora_rank is not None and cfg.q_lora_rank <= 0:
            raise ValueError(f"q_lora_rank: must be None or positive, got {cfg.q_lora_rank}")
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.dtype = dtype
        inv_freq, attention_factor = mla_rope(cfg)
        # static constants (not nnx state): nothing to convert or checkpoint; a tuple stays
        # hashable in the graph definition that nnx.jit caches on
        self.inv_freq = tuple(float(f) for f in inv_freq)
        self.attention_factor = attention_factor
        self.softmax_scale = mla_softmax_scale(cfg)

        d_model, h = cfg.hidden_size, cfg.num_heads
        bias = bool(cfg.attention_bias)
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = dict(eps=LATENT_NORM_EPS, dtype=dtype, param_dtype=param_dtype)
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = linear(d_model, h * qk_dim, bias=False, **lin)
        else:
            self.q_a_proj = linear(d_model, self.q_lora_rank, bias=bias, **lin)
            self.q_a_norm = RMSNorm(self.q_lora_rank, **norm)
            self.q_b_proj = linear(self.q_lora_rank, h * qk_dim, bias=False, **lin)
        self.kv_a_proj = linear(d_model, self.kv_lora_rank + self.rope_dim, bias=bias, **lin)
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, **norm)
        self.kv_b_proj = linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False,
                                **lin)
        self.o_proj = linear(h * self.v_dim, d_model, bias=bias, **lin)

    def rope_cos_sin(self, pos_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B or 1, T, r // 2] f32 for positions [B or 1, T], times the factor."""
        angles = pos_bt.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq,
                                                                            jnp.float32)
        return (jnp.cos(angles) * self.attention_factor, jnp.sin(angles) * self.attention_factor)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [B, T, D], positions [T] or [B, T] int -> [B, T, D]; causal over the T axis."""
        b, t, _ = x.shape
        h, d, r, v = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        x = x.astype(self.dtype)
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.reshape(b, t, h, d + r)
        q_nope, q_rope = q[..., :d], q[..., d:]  # [b, t, h, d], [b, t, h, r]

        kv_a = self.kv_a_proj(x)  # [b, t, kvr + r]
        latent, k_rope = kv_a[..., :self.kv_lora_rank], kv_a[..., self.kv_lora_rank:]
        kv = self.kv_b_proj(self.kv_a_norm(latent)).reshape(b, t, h, d + v)
        k_nope, values = kv[..., :d], kv[..., d:]  # [b, t, h, d], [b, t, h, v]

        cos, sin = self.rope_cos_sin(positions_bt(jnp.asarray(positions), b))  # [b|1, t, r/2]
        q_rope = apply_interleaved_rope(q_rope, cos[:, :, None, :], sin[:, :, None, :])
        k_rope = apply_interleaved_rope(k_rope, cos, sin)  # [b, t, r]: one key for all heads

        # keys [k_nope_h, k_rope] per head (the shared rope key broadcast), as transformers
        q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [b, t, h, d + r]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (b, t, h, r))],
                            axis=-1)  # [b, t, h, d + r]
        out = attention_core(q, k, values, scale=self.softmax_scale)  # [b, t, h, v]
        return self.o_proj(out.reshape(b, t, h * v))
