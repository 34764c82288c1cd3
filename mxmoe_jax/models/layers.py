"""Building blocks shared by every family: RMSNorm, rotary embedding helpers, ``linear``.

The dense SwiGLU MLP is a stack of one expert and lives with the experts in ``moe.py``.

Numerics follow transformers: RMSNorm normalises in f32 and casts back to the input dtype before
the scale; RoPE uses the ``rotate_half`` layout (the two halves of each head are the pair), with
cos/sin computed in f32 and cast to the activation dtype. fp32 models run their matmuls at
``Precision.HIGHEST`` so logits match transformers on GPUs too (no TF32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def matmul_precision(dtype) -> jax.lax.Precision | None:
    """HIGHEST for f32 compute (parity with torch on GPUs, where the default would be TF32)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def linear(d_in: int, d_out: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
           std: float = 0.02) -> nnx.Linear:
    """An ``nnx.Linear`` with a ``[in, out]`` kernel, normal(std) init and our precision rule."""
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      precision=matmul_precision(dtype),
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


class RMSNorm(nnx.Module):
    """``scale * (x / sqrt(mean(x^2) + eps))``, the mean in f32 (as transformers)."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Functional RMSNorm over the last axis; the result has ``x``'s dtype (torch's rule)."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return (scale.astype(x.dtype) * normed).astype(x.dtype)


def default_inv_freq(rot_dim: int, theta: float) -> jax.Array:
    """``1 / theta^(2i / rot_dim)`` for i < rot_dim / 2: the default (unscaled) RoPE, f32."""
    return 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array, *, attention_scaling: float = 1.0,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape ``positions.shape + [rot_dim]`` (halves repeated: rotate_half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., rot_dim / 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [..., rot_dim]
    cos = jnp.cos(emb) * attention_scaling
    sin = jnp.sin(emb) * attention_scaling
    return cos.astype(dtype), sin.astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, d]`` by cos/sin ``[B or 1, T, d]`` (broadcast over heads)."""
    cos = cos_btd[:, :, None, :]
    sin = sin_btd[:, :, None, :]
    return x_bthd * cos + rotate_half(x_bthd) * sin


def positions_bt(positions: jax.Array, batch: int) -> jax.Array:
    """Positions as ``[B or 1, T]`` from ``[T]`` or ``[B, T]``."""
    if positions.ndim == 1:
        return positions[None, :]
    if positions.ndim != 2 or positions.shape[0] not in (1, batch):
        raise ValueError(f"positions must be [T] or [B, T] with B={batch}, "
                         f"got shape {positions.shape}")
    return positions
