"""`QuantizedWeight` and the canonical grid rules every weight quantizer shares.

Glossary: weights are laid out ``[..., K, N]`` (input features K, output features N; a leading
``E`` axis for a stack of experts). A *K-group* is ``scheme.group_size`` consecutive input channels
that share one scale per output channel (``group_size = -1``: one group spanning all of K).

The grid (one per scheme, used by RTN, GPTQ, the packer and the kernels):

* sym:  ``x_hat = q * scale`` with ``q`` in ``[qmin, qmax] = [-(2^(W-1)-1), 2^(W-1)-1]``,
  ``scale = max|x| / qmax`` over the group.
* asym: ``x_hat = q * scale + offset`` with ``q`` in ``[0, 2^W - 1]``, ``offset = min(x)`` and
  ``scale = (max(x) - offset) / qmax`` over the group (the offset is a float, not an integer zero).
* fp8 (``w8a8_g-1_fp8``): ``x_hat = float(q) * scale``, ``q`` float8_e4m3fn,
  ``scale = max|x| / 448``.

Scales and offsets are float16-representable (they are stored as 16-bit floats; see
``QScheme.bits_per_weight``) and are rounded *outward* to float16: the scale up and the asym offset
down, so the grid always covers the group's range and no value is clipped. The codes are computed
from the rounded values (``q = round((x - offset) / scale)``, true division, round half to even), so
every consumer dequantizes to the same numbers. A group whose scale would be 0 (all-zero or, for
asym, constant and float16-exact) gets scale 1: its codes are 0 and it dequantizes exactly. Values
beyond the float16 range of a scale (|x| > 65504 * qmax) are clipped; weights are never that large.

Code dtype: int8 for sym, uint8 for asym (asym codes are ``0..2^W-1``, which for W=8 does not fit
int8), float8_e4m3fn for fp8.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mxmoe_jax.quant.fpexact import F8_E4M3_BITS, F16_BITS, div_rn, prev_float, snap, snap_step
from mxmoe_jax.quant.scheme import QScheme

FP8_MAX = 448.0  # largest finite float8_e4m3fn
F16_MAX = 65504.0  # largest finite float16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """Unpacked quantized weights of one linear block or a stack of experts, laid out [..., K, N].

    Invariants: ``codes`` lie on the scheme's grid (int8 sym / uint8 asym / float8_e4m3fn fp8);
    ``scale`` (and ``offset``, asym only, else None) have shape ``[..., K // group_size, N]``
    (``[..., 1, N]`` per channel), dtype float32, and hold float16-representable values.
    ``dequantize`` gives ``codes * scale (+ offset)`` with the scale broadcast over its K-group.
    """

    codes: jax.Array  # [..., K, N] integer codes (or fp8 values) on the scheme's grid
    scale: jax.Array  # [..., G, N] f32, float16-representable; G = K // group_size or 1
    offset: jax.Array | None  # [..., G, N] f32, float16-representable; asym only
    scheme: QScheme = dataclasses.field(metadata=dict(static=True))  # static pytree metadata

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def group_size(self) -> int:
        """Input channels per scale, resolved (K when the scheme is per channel)."""
        return self.codes.shape[-2] // self.scale.shape[-2]


def codes_dtype(scheme: QScheme):
    """The dtype of ``QuantizedWeight.codes`` for ``scheme``."""
    if scheme.w_bits == 16:
        raise ValueError("scheme: w16a16 is not quantized; it has no codes")
    if scheme.fp8:
        return jnp.float8_e4m3fn
    return jnp.int8 if scheme.sym else jnp.uint8


def _round_f16_down(x: jax.Array) -> jax.Array:
    """The largest float16 value <= ``x`` (f32 in, f32 out), clipped to float16's finite range."""
    return snap(jnp.clip(x, -F16_MAX, F16_MAX), F16_BITS, jnp.floor)


def _covering_scale(span: jax.Array, qmax) -> jax.Array:
    """The smallest float16 ``s`` with ``s * qmax >= span`` (as f32), or 1 where ``span == 0``.

    Decided by products, not by ``span / qmax`` (which a backend may compute a few ulp off; see
    `fpexact`): the quotient only gives a first guess, within one float16 step of the answer, and
    ``s * qmax`` is exact in f32 (11 x 9 bits). Float16 values are handled as f32 on the float16
    grid (`fpexact.snap`), never by casting.
    """
    span = jnp.clip(span, 0.0, F16_MAX * qmax)
    s = snap(span / qmax, F16_BITS, jnp.ceil)
    s = jnp.where(s * qmax < span, s + snap_step(s, F16_BITS), s)
    down = s - snap_step(prev_float(s), F16_BITS)  # the float16 below s (s > 0)
    s = jnp.where((s > 0) & (down * qmax >= span), down, s)
    return jnp.where(span == 0, 1.0, s)


def grid_params(
    lo: jax.Array, hi: jax.Array, scheme: QScheme
) -> tuple[jax.Array, jax.Array | None]:
    """Scale (and asym offset) for groups whose values span ``[lo, hi]`` (f32, any shape).

    The one place that turns a range into grid parameters: RTN passes each group's min/max, GPTQ
    passes the min/max of the (error-updated) weights of the group it is about to quantize.
    """
    lo = lo.astype(jnp.float32)
    hi = hi.astype(jnp.float32)
    if scheme.fp8 or scheme.sym:
        qmax = FP8_MAX if scheme.fp8 else jnp.asarray(scheme.qmax, jnp.float32)
        return _covering_scale(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), qmax), None
    offset = _round_f16_down(lo)
    return _covering_scale(hi - offset, jnp.asarray(scheme.qmax, jnp.float32)), offset


def encode(x: jax.Array, scale: jax.Array, offset: jax.Array | None, scheme: QScheme) -> jax.Array:
    """Codes of ``x`` on the grid given by ``scale``/``offset`` (broadcast against ``x``).

    ``round_half_even(RN((x - offset) / scale))`` clipped to the code range (fp8: ``RN`` to
    float8_e4m3fn of the clipped quotient): NumPy's f32 ``round(x / scale)``, with the quotient
    from `fpexact.div_rn` so every backend gives these bits.
    """
    x = x.astype(jnp.float32)
    shifted = x if offset is None else x - offset
    scale = jnp.broadcast_to(scale, shifted.shape)
    # (qmin/qmax may be traced: GPTQ compiles one body for every bit width)
    lim = FP8_MAX if scheme.fp8 else jnp.maximum(-scheme.qmin, scheme.qmax).astype(jnp.float32)
    mag = jnp.abs(shifted)
    # div_rn needs a positive normal quotient: below 2^-12 every code is 0 and above lim + 1 the
    # clip decides, so those elements take a stand-in (the products are exact)
    zero = mag < scale * 2.0 ** -12
    big = mag >= scale * (lim + 1)
    quot = div_rn(jnp.where(zero | big, scale, mag), scale)
    quot = jnp.sign(shifted) * jnp.where(zero, 0.0, jnp.where(big, lim + 1, quot))
    if scheme.fp8:
        q = snap(jnp.clip(quot, -FP8_MAX, FP8_MAX), F8_E4M3_BITS)  # exact; the cast changes nothing
        return q.astype(jnp.float8_e4m3fn)
    q = jnp.clip(jnp.round(quot), scheme.qmin, scheme.qmax)
    return q.astype(codes_dtype(scheme))


def decode(codes: jax.Array, scale: jax.Array, offset: jax.Array | None) -> jax.Array:
    """``codes * scale (+ offset)`` in f32, with ``scale``/``offset`` already broadcastable."""
    x = codes.astype(jnp.float32) * scale
    return x if offset is None else x + offset


def _expand_groups(p: jax.Array, k: int) -> jax.Array:
    """[..., G, N] -> [..., K, N] by repeating each group's row over its K-group."""
    return jnp.repeat(p, k // p.shape[-2], axis=-2)


def dequantize(qw: QuantizedWeight) -> jax.Array:
    """[..., K, N] f32: ``codes * scale (+ offset)``, each scale broadcast over its K-group."""
    k = qw.codes.shape[-2]
    offset = None if qw.offset is None else _expand_groups(qw.offset, k)
    return decode(qw.codes, _expand_groups(qw.scale, k), offset)
