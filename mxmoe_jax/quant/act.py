"""Dynamic symmetric activation quantization (per token, or per token and K-group).

For ``a_bits`` in {4, 8}: ``scale = max|x| / a_qmax`` over each token's row (``group_size = -1``) or
each ``group_size``-wide slice of it, codes ``round(x / scale)`` (true division, round half to even)
clipped to ``[-a_qmax, a_qmax]``, int8. For ``w8a8_g-1_fp8``: ``scale = max|x| / 448`` per token,
codes ``x / scale`` cast to float8_e4m3fn. Activation scales are f32 (computed at run time, never
stored, so unlike weight scales they are not rounded to float16). An all-zero row/group gets
scale 1. Computed in f32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mxmoe_jax.quant.qtensor import FP8_MAX
from mxmoe_jax.quant.scheme import QScheme


def _check(x: jax.Array, scheme: QScheme) -> int:
    """Validate; returns the activation group size resolved to an int (K when per token)."""
    if scheme.weight_only:
        raise ValueError(f"scheme: {scheme.name} does not quantize activations (a_bits=16)")
    if x.ndim != 2:
        raise ValueError(f"x: expected [M, K] activations, got shape {tuple(x.shape)}")
    k = x.shape[1]
    if scheme.group_size == -1:
        return k
    if k % scheme.group_size:
        raise ValueError(f"group_size: {scheme.group_size} does not divide the activations' K={k}")
    return scheme.group_size


def quantize_activations(x: jax.Array, scheme: QScheme | str) -> tuple[jax.Array, jax.Array]:
    """``x`` [M, K] -> (codes [M, K] int8 or float8_e4m3fn, scale [M, K // group_size or 1] f32)."""
    scheme = QScheme.parse(scheme)
    gs = _check(x, scheme)
    m, k = x.shape
    xg = jnp.asarray(x).astype(jnp.float32).reshape(m, k // gs, gs)  # [M, G, gs]
    amax = jnp.max(jnp.abs(xg), axis=-1)  # [M, G]
    qmax = FP8_MAX if scheme.fp8 else float(scheme.a_qmax)
    scale = amax / qmax
    scale = jnp.where(scale == 0, 1.0, scale)  # all-zero rows stay zero and finite
    y = xg / scale[..., None]
    if scheme.fp8:
        codes = jnp.clip(y, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    else:
        codes = jnp.clip(jnp.round(y), -qmax, qmax).astype(jnp.int8)
    return codes.reshape(m, k), scale


def dequantize_activations(codes: jax.Array, scale: jax.Array) -> jax.Array:
    """Inverse of ``quantize_activations``: [M, K] f32."""
    m, k = codes.shape
    g = scale.shape[1]
    return (codes.astype(jnp.float32).reshape(m, g, k // g) * scale[..., None]).reshape(m, k)


def fake_quant_activations(x: jax.Array, scheme: QScheme | str) -> jax.Array:
    """Quantize-dequantize ``x`` [M, K] (any leading axes allowed); identity when a_bits = 16.

    Returned in ``x``'s dtype so it can sit inside a bf16 or f32 forward.
    """
    scheme = QScheme.parse(scheme)
    if scheme.weight_only:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    y = dequantize_activations(*quantize_activations(x2, scheme))
    return y.reshape(x.shape).astype(x.dtype)
