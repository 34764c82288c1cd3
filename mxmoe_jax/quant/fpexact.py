"""Floating-point operations whose result bits do not depend on the backend or the compiler.

Two things make the same jnp code give different bits on the CPU and the GPU, and eagerly and
under jit: (1) division: XLA's algebraic simplifier rewrites ``A / broadcast(B)`` into
``A * broadcast(1 / B)`` and ``A / constant`` into ``A * (1 / constant)``, and XLA's GPU backend
lowers f32 division to ``div.full.f32`` (up to 2 ulp off); (2) narrowing round trips: with XLA's
default ``xla_allow_excess_precision`` the GPU compiler deletes ``f32 -> f16 -> f32`` (and
``f32 -> float8 -> f32``) conversion pairs inside one fusion, so a value meant to be rounded to
float16 or float8 stays f32 there (on the H200 this gave 1-ulp-of-f16 other scales for a third of
the columns of a random weight, and unquantized "fp8" activations in a fused fake quantization).

So the quantizers never divide with ``/`` where the bits matter and never round by casting:

* `div_rn`: the correctly rounded f32 quotient, by int32 long division;
* `snap`: ``x`` rounded (nearest even, floor or ceil) to the grid of a narrower binary float
  (float16: 10 fraction bits, min normal exponent -14; float8_e4m3fn: 3 and -6), by a multiply
  with an exact power of two, an integer rounding and the multiply back, all exact IEEE operations
  that nothing rewrites. The result is an f32 on that grid; a later cast to the narrow dtype is
  exact, so it does not matter whether a compiler keeps it;
* `widen` and `narrow`: bfloat16 <-> f32 through the bit patterns (round to nearest even when
  narrowing), for the fake-quantization reference, whose bf16 intermediates must be rounded as a
  bf16 model rounds them (and as the kernels, whose outputs are real bf16 arrays, do): inside a
  GPU fusion an ``f32 -> bf16 -> f32`` pair is deleted like the float16 one, and a one-ulp change
  of a value that is then quantized to 4 or 8 bits moves its code at every near-tie.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F16_BITS = (10, -14)  # float16: fraction bits, smallest normal exponent
F8_E4M3_BITS = (3, -6)  # float8_e4m3fn


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


def _pow2(biased: jax.Array) -> jax.Array:
    """``2^(biased - 127)`` as f32 for int32 ``biased`` in [1, 254] (built from its bit pattern)."""
    return lax.bitcast_convert_type(biased << 23, jnp.float32)


def _biased_exponent(x: jax.Array) -> jax.Array:
    """The f32 biased exponent field of ``|x|`` (0 for zero and f32 subnormals), int32."""
    return (lax.bitcast_convert_type(x, jnp.int32) >> 23) & 0xFF


def widen(x: jax.Array) -> jax.Array:
    """``x`` as f32. A bfloat16 ``x`` is widened from its bit pattern, so its bf16 rounding is
    kept even where a compiler would have fused it away (see the module doc)."""
    if x.dtype != jnp.bfloat16:
        return x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return lax.bitcast_convert_type(bits, jnp.float32)


def narrow(y: jax.Array, dtype) -> jax.Array:
    """f32 ``y`` cast to ``dtype``; to bfloat16 by round to nearest even on the bit pattern (the
    IEEE cast's result, NaN staying NaN), which no compiler can skip."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return y.astype(dtype)
    bits = lax.bitcast_convert_type(y.astype(jnp.float32), jnp.uint32)
    rounded = bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    nan = jnp.isnan(y)
    top = jnp.where(nan, (bits >> 16) | jnp.uint32(0x40), rounded >> 16)  # quiet NaN
    return lax.bitcast_convert_type(top.astype(jnp.uint16), jnp.bfloat16)


def snap_step(x: jax.Array, fmt: tuple[int, int]) -> jax.Array:
    """The grid step of the narrow float ``fmt = (fraction bits, min normal exponent)`` at ``x``
    (f32): ``2^(max(e, emin) - fraction bits)`` for ``|x|`` in ``[2^e, 2^(e+1))``."""
    frac, emin = fmt
    return _pow2(jnp.maximum(_biased_exponent(x), emin + 127) - frac)


def snap(x: jax.Array, fmt: tuple[int, int], rounding=jnp.round) -> jax.Array:
    """``x`` (f32) rounded by ``rounding`` (``jnp.round`` = nearest even, ``jnp.floor``,
    ``jnp.ceil``) to the grid of the narrow float ``fmt``, as f32; no upper range limit (clip
    first). Exact: ``x`` is multiplied by the inverse step (a power of two), rounded to an integer
    and multiplied back by the step, so the bits are the same on every backend and in every
    compilation context."""
    x = jnp.asarray(x, jnp.float32)
    frac, emin = fmt
    e = jnp.maximum(_biased_exponent(x), emin + 127) - frac  # biased exponent of the step
    return rounding(x * _pow2(254 - e)) * _pow2(e)


def prev_float(x: jax.Array) -> jax.Array:
    """The f32 just below a positive f32 ``x`` (one step down its bit pattern)."""
    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int32) - 1, jnp.float32)
