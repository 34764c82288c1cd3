"""Round-to-nearest (RTN) weight quantization on the canonical grid (see ``qtensor``).

The original's ``quant_minmax`` [code]: per K-group min/max (asym) or max|x| (sym), no clipping
search. Ours differs only where the original was inconsistent (one sym grid ``-qmax..qmax`` for all
quantizers) and in rounding the scale/offset outward to float16 so nothing is clipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize, encode, grid_params
from mxmoe_jax.quant.scheme import QScheme


def check_weight_shape(shape: tuple[int, ...], scheme: QScheme) -> int:
    """Validate a [..., K, N] weight shape for ``scheme``; returns G (K-groups per channel)."""
    if len(shape) < 2:
        raise ValueError(f"w: expected [..., K, N] weights, got shape {tuple(shape)}")
    return scheme.scale_groups(shape[-2])  # raises when group_size does not divide K


def _grouped(w: jax.Array, scheme: QScheme) -> jax.Array:
    """[..., K, N] -> [..., G, group_size, N] (G = 1 per channel)."""
    k, n = w.shape[-2:]
    g = check_weight_shape(w.shape, scheme)
    return w.reshape(*w.shape[:-2], g, k // g, n)


@functools.partial(jax.jit, static_argnames="scheme")
def _quantize_rtn(w: jax.Array, scheme: QScheme) -> QuantizedWeight:
    wg = _grouped(w.astype(jnp.float32), scheme)  # [..., G, gs, N]
    scale, offset = grid_params(wg.min(axis=-2), wg.max(axis=-2), scheme)  # [..., G, N]
    codes = encode(wg, scale[..., None, :], None if offset is None else offset[..., None, :],
                   scheme)
    return QuantizedWeight(codes=codes.reshape(w.shape), scale=scale, offset=offset,
                           scheme=scheme)


def quantize_rtn(w: jax.Array, scheme: QScheme | str) -> QuantizedWeight:
    """RTN-quantize weights ``w`` [..., K, N] (any leading axes, e.g. experts) with ``scheme``.

    Groups run along K; raises ValueError if ``group_size`` does not divide K or the scheme is
    w16a16 (not quantized).
    """
    scheme = QScheme.parse(scheme)
    if scheme.w_bits == 16:
        raise ValueError("scheme: w16a16 is not quantized (use the bf16 weights as they are)")
    check_weight_shape(tuple(w.shape), scheme)  # eager, so the error is not a trace error
    return _quantize_rtn(jnp.asarray(w), scheme)


def fake_quant_weight(w: jax.Array, scheme: QScheme | str) -> jax.Array:
    """RTN quantize-dequantize in f32; w16a16 rounds to bf16 (the unquantized baseline)."""
    scheme = QScheme.parse(scheme)
    if scheme.w_bits == 16:
        return jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32)
    return dequantize(quantize_rtn(w, scheme))
