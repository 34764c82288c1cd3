"""Dynamic symmetric activation quantization (per token, or per token and K-group).

The definition (the spec; ``kernels/pallas/act_quant.py`` computes the same bits). ``Q`` is
``a_qmax`` for ``a_bits`` in {4, 8} and 448 for ``w8a8_g-1_fp8``; ``amax = max|x|`` over each
token's row (``group_size = -1``) or each ``group_size``-wide slice of it, in f32 whatever the
input dtype. With ``RN`` the IEEE f32 round-to-nearest-even of the exact real value:

* ``scale = RN(amax / Q)`` (the dequantization scale) and ``inv = RN(Q / amax)``, one correctly
  rounded division each, computed once per row/group by `div_rn`;
* codes ``round_half_even(RN(x * inv))`` clipped to ``[-Q, Q]``, int8; for FP8
  ``RN(x * inv)`` clipped to ``[-448, 448]`` and rounded (to nearest even) to float8_e4m3fn
  (by `fpexact.snap`, exact, then a cast that changes nothing);
* a row/group with ``amax < 2^-100`` (in practice: all zero) gets scale 1 and codes 0.

Why a multiply by a per-row reciprocal and not ``x / scale``: compilers do not keep ``x / scale``.
XLA's algebraic simplifier rewrites ``A / broadcast(B)`` into ``A * broadcast(1 / B)`` and
``A / constant`` into ``A * (1 / constant)`` (so jitted ``max|x| / Q`` and ``x / scale`` were
really ``amax * RN(1/Q)`` and ``x * RN(1 / scale)``); XLA's GPU backend lowers f32 division to
``div.full.f32`` (up to 2 ulp off) and Triton's ``/`` likewise. Near a ``.5`` tie each of these
moves a code by one. A multiply and a round are exact IEEE operations that nothing rewrites, and
`div_rn` gets the two per-row quotients exactly with int32 arithmetic only, so the codes and
scales are the same bits eagerly, under jit, vmap or inside a larger fused jit, on the CPU and the
GPU, in this reference and in the Pallas kernel (compiled or interpreted). They can differ from
NumPy's ``round(x / scale)`` by one where ``x / scale`` is within ~1 f32 ulp of a ``.5`` tie.

Activation scales are f32 (computed at run time, never stored, so unlike weight scales they are
not rounded to float16). NaN or infinite inputs are not supported.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mxmoe_jax.quant.fpexact import F8_E4M3_BITS, div_rn, snap
from mxmoe_jax.quant.qtensor import FP8_MAX
from mxmoe_jax.quant.scheme import QScheme

ZERO_BELOW = 2.0 ** -100  # amax below this: the row/group counts as all zero (scale 1, codes 0)


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


def scale_and_inverse(amax: jax.Array, qmax: float) -> tuple[jax.Array, jax.Array]:
    """Per row/group ``(scale, inv) = (RN(amax / qmax), RN(qmax / amax))``; ``(1, 0)`` where
    ``amax < 2^-100``. ``amax`` f32 ``[...]``, ``qmax`` a Python number (7, 127, 448, ...).

    The one place both the reference and the Pallas kernel compute them (see the module doc).
    """
    zero = amax < ZERO_BELOW
    a = jnp.where(zero, 1.0, amax)
    scale = jnp.where(zero, 1.0, div_rn(a, qmax))
    inv = jnp.where(zero, 0.0, div_rn(qmax, a))
    return scale, inv


def quantize_activations(x: jax.Array, scheme: QScheme | str) -> tuple[jax.Array, jax.Array]:
    """``x`` [M, K] -> (codes [M, K] int8 or float8_e4m3fn, scale [M, K // group_size or 1] f32)."""
    scheme = QScheme.parse(scheme)
    gs = _check(x, scheme)
    m, k = x.shape
    xg = jnp.asarray(x).astype(jnp.float32).reshape(m, k // gs, gs)  # [M, G, gs]
    amax = jnp.max(jnp.abs(xg), axis=-1)  # [M, G]
    qmax = FP8_MAX if scheme.fp8 else float(scheme.a_qmax)
    scale, inv = scale_and_inverse(amax, qmax)
    y = xg * inv[..., None]
    if scheme.fp8:
        # rounded to the float8 grid by `snap`, not by the cast: a fused f32 -> f8 -> f32 round
        # trip may be deleted by the GPU compiler (see `fpexact`); the cast is then exact
        codes = snap(jnp.clip(y, -FP8_MAX, FP8_MAX), F8_E4M3_BITS).astype(jnp.float8_e4m3fn)
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
