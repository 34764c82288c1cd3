"""Dynamic symmetric activation quantization kernel (per token, or per token and 128-wide K-group).

``quantize_activations_multi`` quantizes one ``x`` into several formats of one group layout (a
mixed layer's int8 and int4 segments) in one launch that reads ``x`` once.

The same function, bit for bit, as ``mxmoe_jax.quant.act.quantize_activations`` (its docstring is
the spec): per row or K-group ``amax = max|x|``, ``(scale, inv) = (RN(amax / Q), RN(Q / amax))``
from ``act.scale_and_inverse`` (the reference's own code: int32 long division, exact on every
backend; ``(1, 0)`` for a group with ``amax < 2^-100``), codes ``round_half_even(RN(x * inv))``
clipped to ``[-a_qmax, a_qmax]`` (int8), or ``RN(x * inv)`` clipped to ``[-448, 448]`` and cast to
float8_e4m3fn. One program per ``bm`` rows and K-group (per token: the whole row, padded to a
power of two) loads its block once: max, scale, quantize, store.

No floating-point division anywhere: Triton lowers f32 ``/`` to the approximate ``div.full.f32``.
Compiled, the per-element multiply and round are PTX ``mul.rn.f32`` and ``cvt.rni.f32.f32``
through ``elementwise_inline_asm`` (an explicitly rounded multiply is never contracted into an FMA
with what follows, and Triton has no round primitive here); interpret mode computes the same
values with jnp (``jnp.round`` is round half to even).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mxmoe_jax.quant.act import scale_and_inverse
from mxmoe_jax.quant.scheme import QScheme

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu

FP8_MAX = 448.0


def _mul_round(x, inv, *, rnd: bool, interpret: bool):
    """``RN(x * inv)``, then (``rnd``) rounded half to even to an integer, elementwise, f32."""
    if interpret:
        y = x * inv
        return jnp.round(y) if rnd else y
    asm = ("{\n.reg .f32 t;\nmul.rn.f32 t, $1, $2;\ncvt.rni.f32.f32 $0, t;\n}" if rnd
           else "mul.rn.f32 $0, $1, $2;")
    return plgpu.elementwise_inline_asm(
        asm, args=[x, inv], constraints="=f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _act_quant_kernel(
    # inputs
    x_ref,
    # outputs: (codes, scale) per format
    *out_refs,
    k: int, m: int, bm: int, width: int, formats: tuple[tuple[float, bool], ...],
    interpret: bool,
):
    """One ``[bm, width]`` block (the whole row per token, or one K-group), loaded once and
    quantized into every format ``(qmax, fp8)`` of ``formats`` (their group layout is one)."""
    i, g = pl.program_id(0), pl.program_id(1)
    r0 = i * bm
    c0 = g * width
    rows_ok = (r0 + jnp.arange(bm)) < m
    ks = c0 + jnp.arange(width)
    mask = rows_ok[:, None] & (ks < k)[None, :]
    xb = plgpu.load(x_ref.at[pl.ds(r0, bm), pl.ds(c0, width)], mask=mask, other=0.0)
    xb = xb.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xb), axis=1)
    for f, (qmax, fp8) in enumerate(formats):
        q_ref, s_ref = out_refs[2 * f], out_refs[2 * f + 1]
        scale, inv = scale_and_inverse(amax, qmax)
        plgpu.store(s_ref.at[pl.ds(r0, bm), g], scale, mask=rows_ok)
        y = _mul_round(xb, jnp.broadcast_to(inv[:, None], xb.shape), rnd=not fp8,
                       interpret=interpret)
        if fp8:
            q = jnp.clip(y, -FP8_MAX, FP8_MAX).astype(q_ref.dtype)
        else:
            q = jnp.clip(y, -qmax, qmax).astype(q_ref.dtype)
        plgpu.store(q_ref.at[pl.ds(r0, bm), pl.ds(c0, width)], q, mask=mask)


def _block_rows(width: int) -> int:
    """Rows per program: ~8K elements in registers (4 warps), at least 1, at most 16."""
    return max(1, min(16, 8192 // width))


@functools.partial(jax.jit, static_argnames=("schemes", "interpret"))
def _quantize(x, *, schemes: tuple[QScheme, ...], interpret: bool):
    m, k = x.shape
    group_size = schemes[0].group_size
    if group_size == -1:
        width, groups = pl.next_power_of_2(k), 1
    else:
        width, groups = group_size, k // group_size
    bm = _block_rows(width)
    formats = tuple((FP8_MAX if s.fp8 else float(s.a_qmax), s.fp8) for s in schemes)
    kernel = functools.partial(_act_quant_kernel, k=k, m=m, bm=bm, width=width, formats=formats,
                               interpret=interpret)
    out_shape = []
    for s in schemes:
        out_shape += [jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn if s.fp8 else jnp.int8),
                      jax.ShapeDtypeStruct((m, groups), jnp.float32)]
    outs = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(-(-m // bm), groups),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="act_quant_" + "+".join(s.name for s in schemes),
    )(x)
    return [(outs[2 * f], outs[2 * f + 1]) for f in range(len(schemes))]


def quantize_activations_multi(x: jax.Array, schemes, *,
                               interpret: bool = False) -> list[tuple[jax.Array, jax.Array]]:
    """``x`` [M, K] quantized into several activation formats of ONE group layout (per token,
    or one K-group size) by one launch that reads ``x`` once: ``[(codes, scale)]`` per scheme,
    each bit for bit ``quantize_activations(x, scheme)``."""
    schemes = tuple(QScheme.parse(s) for s in schemes)
    if not schemes:
        raise ValueError("schemes: nothing to quantize")
    for scheme in schemes:
        if scheme.weight_only:
            raise ValueError(f"scheme: {scheme.name} does not quantize activations (a_bits=16)")
    if len({s.group_size for s in schemes}) != 1:
        raise ValueError("schemes: one launch quantizes one group layout, got group sizes "
                         f"{sorted({s.group_size for s in schemes})}")
    if x.ndim != 2:
        raise ValueError(f"x: expected [M, K], got shape {x.shape}")
    k = x.shape[1]
    g = schemes[0].group_size
    if g != -1 and (g & (g - 1) or k % g):
        raise ValueError(f"group_size: kernel needs a power of two dividing K={k}, got {g}")
    if x.shape[0] == 0:
        groups = 1 if g == -1 else k // g
        return [(jnp.zeros((0, k), jnp.float8_e4m3fn if s.fp8 else jnp.int8),
                 jnp.zeros((0, groups), jnp.float32)) for s in schemes]
    return _quantize(x, schemes=schemes, interpret=interpret)


def quantize_activations(x: jax.Array, scheme: QScheme | str, *,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """``x`` [M, K] -> (codes [M, K] int8 or float8_e4m3fn, scale [M, G] f32), in Pallas."""
    return quantize_activations_multi(x, [scheme], interpret=interpret)[0]


def quantize_activations_reference(x: jax.Array, scheme: QScheme | str):
    """The quantization core's pure-jnp definition (the spec this kernel follows)."""
    from mxmoe_jax.quant.act import quantize_activations as ref

    return ref(x, scheme)
