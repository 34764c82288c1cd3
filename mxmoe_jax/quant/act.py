"""Dynamic symmetric activation quantization (per token, or per token and K-group).

The definition (the spec; ``kernels/pallas/act_quant.py`` computes the same bits). ``Q`` is
``a_qmax`` for ``a_bits`` in {4, 8} and 448 for ``w8a8_g-1_fp8``; ``amax = max|x|`` over each
token's row (``group_size = -1``) or each ``group_size``-wide slice of it, in f32 whatever the
input dtype. With ``RN`` the IEEE f32 round-to-nearest-even of the exact real value:

* ``scale = RN(amax / Q)`` (the dequantization scale) and ``inv = RN(Q / amax)``, one correctly
  rounded division each, computed once per row/group by `div_rn`;
* codes ``round_half_even(RN(x * inv))`` clipped to ``[-Q, Q]``, int8; for FP8
  ``RN(x * inv)`` clipped to ``[-448, 448]`` and rounded (to nearest even) to float8_e4m3fn;
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
import numpy as np
from jax import lax

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


def _parts(v):
    """(biased exponent, 24-bit significand) of a positive normal f32: ``v = m * 2^(e-150)``."""
    if isinstance(v, (int, float)):
        b = int(np.asarray(v, np.float32).view(np.int32))
        return b >> 23, (b & 0x7FFFFF) | 0x800000
    b = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
    return b >> 23, (b & 0x7FFFFF) | 0x800000


def div_rn(n, d) -> jax.Array:
    """``RN(n / d)``, the correctly rounded f32 quotient, with int32 arithmetic only.

    ``n`` and ``d`` are f32 arrays of one shape, or one of them a Python number; both positive
    and normal, and the quotient a normal f32 (the caller guarantees it; nothing is checked).
    The significands are divided by schoolbook long division (25 quotient bits and a sticky
    remainder), then rounded half to even, so the result does not depend on how a backend
    implements (or rewrites) floating-point division. Lowers in Pallas (Triton) kernels too.
    """
    en, mn = _parts(n)
    ed, md = _parts(d)
    shape = jnp.shape(n if not isinstance(n, (int, float)) else d)
    r = jnp.broadcast_to(jnp.asarray(mn, jnp.int32), shape)
    md = jnp.broadcast_to(jnp.asarray(md, jnp.int32), shape)
    q = jnp.zeros(shape, jnp.int32)
    for k in (7, 6, 6, 6):  # r < 2^24 before each shift, so r << 7 stays below 2^31
        r = r << k
        digit = lax.div(r, md)
        r = r - digit * md
        q = (q << k) | digit
    # q = floor(mn * 2^25 / md) in [2^24, 2^26); r the remainder
    big = q >= (1 << 25)  # mn >= md: the quotient's significand is in [1, 2)
    q = jnp.where(big, q, q << 1)  # [2^25, 2^26): 24 significand bits, a guard bit, a round bit
    sig = q >> 2
    guard = (q >> 1) & 1
    rest = (q & 1) | (r != 0).astype(jnp.int32)
    up = guard & (rest | (sig & 1))
    e = en - ed + 126 + big.astype(jnp.int32)  # biased exponent of the quotient
    # a significand rounded up to 2^24 carries into the exponent field, as IEEE rounding does
    return lax.bitcast_convert_type((e << 23) + (sig - (1 << 23)) + up, jnp.float32)


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
