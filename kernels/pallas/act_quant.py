"""Dynamic symmetric activation quantization kernel (per token, or per token and 128-wide K-group).

The same function as ``mxmoe_jax.quant.act.quantize_activations`` (its docstring is the spec):
``scale = max|x| / a_qmax`` (``/ 448`` for FP8) per row or per K-group, 1 for an all-zero group,
codes ``round_half_even(x / scale)`` clipped to ``[-a_qmax, a_qmax]`` (int8), or ``x / scale`` cast
to float8_e4m3fn. One program per ``bm`` rows walks K in 128-wide chunks: per-token scales need
two passes (max, then quantize; the second read hits L2), per-group scales one.

Triton has no round primitive here, so rounding uses the f32 trick
``(y + 1.5 * 2^23) - 1.5 * 2^23``, exact round-half-to-even for ``|y| < 2^22`` (codes are at most 127).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mxmoe_jax.quant.scheme import QScheme

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu

FP8_MAX = 448.0
_ROUND = 12582912.0  # 1.5 * 2**23
CHUNK = 128  # K per step


def _act_quant_kernel(
    # inputs
    x_ref,
    # outputs
    q_ref, s_ref,
    *, k: int, m: int, bm: int, group_size: int, qmax: float, fp8: bool,
):
    i = pl.program_id(0)
    r0 = i * bm
    rows_ok = (r0 + jnp.arange(bm)) < m
    chunks = -(-k // CHUNK)

    def load(c):
        ks = c * CHUNK + jnp.arange(CHUNK)
        return plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(c * CHUNK, CHUNK)],
                          mask=rows_ok[:, None] & (ks < k)[None, :], other=0.0
                          ).astype(jnp.float32), ks

    def quantize_store(c, xc, ks, scale):
        y = xc / scale[:, None]
        if fp8:
            q = jnp.clip(y, -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
        else:
            q = jnp.clip((y + _ROUND) - _ROUND, -qmax, qmax).astype(q_ref.dtype)
        plgpu.store(q_ref.at[pl.ds(r0, bm), pl.ds(c * CHUNK, CHUNK)], q,
                    mask=rows_ok[:, None] & (ks < k)[None, :])

    def to_scale(amax):
        scale = amax / qmax
        return jnp.where(scale == 0, 1.0, scale)

    if group_size == -1:
        def max_body(c, amax):
            xc, _ = load(c)
            return jnp.maximum(amax, jnp.max(jnp.abs(xc), axis=1))

        scale = to_scale(lax.fori_loop(0, chunks, max_body, jnp.zeros((bm,), jnp.float32)))
        plgpu.store(s_ref.at[pl.ds(r0, bm), jnp.int32(0)], scale, mask=rows_ok)

        @pl.loop(0, chunks)
        def _(c):
            xc, ks = load(c)
            quantize_store(c, xc, ks, scale)
    else:
        # group_size is a multiple of 128: a chunk lies in one group
        per = group_size // CHUNK

        @pl.loop(0, k // group_size)
        def _(g):
            def max_body(jj, amax):
                xc, _ = load(g * per + jj)
                return jnp.maximum(amax, jnp.max(jnp.abs(xc), axis=1))

            scale = to_scale(lax.fori_loop(0, per, max_body, jnp.zeros((bm,), jnp.float32)))
            plgpu.store(s_ref.at[pl.ds(r0, bm), g], scale, mask=rows_ok)

            @pl.loop(0, per)
            def _(jj):
                xc, ks = load(g * per + jj)
                quantize_store(g * per + jj, xc, ks, scale)


@functools.partial(jax.jit, static_argnames=("scheme", "bm", "interpret"))
def _quantize(x, *, scheme: QScheme, bm: int, interpret: bool):
    m, k = x.shape
    groups = 1 if scheme.group_size == -1 else k // scheme.group_size
    qdtype = jnp.float8_e4m3fn if scheme.fp8 else jnp.int8
    qmax = FP8_MAX if scheme.fp8 else float(scheme.a_qmax)
    kernel = functools.partial(_act_quant_kernel, k=k, m=m, bm=bm,
                               group_size=scheme.group_size, qmax=qmax, fp8=scheme.fp8)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, k), qdtype),
                   jax.ShapeDtypeStruct((m, groups), jnp.float32)),
        grid=(-(-m // bm),),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"act_quant_{scheme.name}",
    )(x)


def quantize_activations(x: jax.Array, scheme: QScheme | str, *, bm: int = 16,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``x`` [M, K] -> (codes [M, K] int8 or float8_e4m3fn, scale [M, G] f32), in Pallas."""
    scheme = QScheme.parse(scheme)
    if scheme.weight_only:
        raise ValueError(f"scheme: {scheme.name} does not quantize activations (a_bits=16)")
    if x.ndim != 2:
        raise ValueError(f"x: expected [M, K], got shape {x.shape}")
    k = x.shape[1]
    if scheme.group_size != -1 and (scheme.group_size % CHUNK or k % scheme.group_size):
        raise ValueError(
            f"group_size: kernel needs a multiple of {CHUNK} dividing K={k}, got "
            f"{scheme.group_size}")
    if bm < 1 or bm & (bm - 1):
        raise ValueError(f"bm: {bm} must be a power of two")
    return _quantize(x, scheme=scheme, bm=bm, interpret=interpret)


def quantize_activations_reference(x: jax.Array, scheme: QScheme | str):
    """The quantization core's pure-jnp definition (the spec this kernel follows)."""
    from mxmoe_jax.quant.act import quantize_activations as ref

    return ref(x, scheme)
