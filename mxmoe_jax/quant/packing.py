"""Packed weight layouts for the grouped-GEMM kernels: ``pack(qw) -> PackedWeight`` and back.

The layouts are chosen for what the kernels in ``kernels/pallas/grouped_gemm.py`` load (that
module's docstring documents them once, with the reasons); this file is their pure-jnp twin.
Summary:

* Weight-only schemes (``a_bits == 16``; w8/w4/w3/w2): K-major ``[..., N, Kp / v]`` (K contiguous:
  the dot's B operand then reaches registers by ``ldmatrix``, 4 consecutive K codes per 32-bit
  register, instead of one byte per shared-memory load), codes stored unsigned, ``u = code + bias``
  with ``bias = 2^(w_bits-1)`` for sym and 0 for asym. 8-bit codes are one byte each. Sub-byte codes
  (w4 and w3 in a nibble, w2 in two bits) are packed along K inside *chunks* of 128: byte ``c * 128
  / v + r`` of chunk ``c`` holds K index ``c * 128 + j * (128 / v) + r`` in bits ``[j * s, (j + 1) *
  s)`` for ``j < v = 8 / s``. So one loaded byte tile unpacks, by shifts and masks alone, into ``v``
  contiguous K slices that the kernel multiplies with ``v`` separately loaded slices of x (no
  interleaving and no slicing of loaded values). K is padded with zero codes to a multiple of 128.
* Weight-activation integer schemes (w8a8, w4a8, w4a4): K-major ``[..., N, K]`` (Triton's int8 dot
  wants both operands K-major), int8 codes; 4-bit codes are offset-binary nibbles ``u = code + 8``
  in the same 128-row chunks (``v = 2``; zero padding is ``u = 0``). FP8 (``w8a8_g-1_fp8``):
  ``float8_e4m3fn`` codes ``[..., N, K]``.
* Scales and offsets keep the shape ``[..., K // group_size or 1, N]`` of ``QuantizedWeight`` and
  are stored as float16 (they are float16-representable by the interface contract, so this is
  exact and halves their bytes).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.quant.qtensor import QuantizedWeight, codes_dtype
from mxmoe_jax.quant.scheme import QScheme

# K rows per packing chunk (also the K step of the sub-byte kernels).
CHUNK = 128


def storage_bits(scheme: QScheme) -> int:
    """Bits one stored code takes: 8, 4 (w4 and w3) or 2."""
    if scheme.w_bits == 16:
        return 16
    if scheme.w_bits == 8:
        return 8
    return 2 if scheme.w_bits == 2 else 4


def code_bias(scheme: QScheme) -> int:
    """``u = code + bias`` for weight-only storage (0 for weight-activation schemes)."""
    if not scheme.weight_only or scheme.w_bits == 16:
        return 0
    return 2 ** (scheme.w_bits - 1) if scheme.sym else 0


def k_major(scheme: QScheme) -> bool:
    """Weight-activation schemes store weights ``[..., N, K]`` (K contiguous)."""
    return not scheme.weight_only


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """Quantized weights in the kernels' storage layout (see the module docstring).

    Invariants: ``qweight`` is uint8 ``[..., N, Kp / v]`` (weight-only), int8 ``[..., N, Kp / v]``
    (integer weight-activation) or float8_e4m3fn ``[..., N, K]`` (fp8), with ``Kp`` = ``k``
    rounded up to a multiple of 128 for sub-byte codes (else ``Kp = k``); ``scale`` (and
    ``offset`` for asym) are float16 ``[..., G, N]`` with ``G = k // group_size`` or 1.
    """

    qweight: jax.Array  # packed codes, layout above
    scale: jax.Array  # [..., G, N] float16
    offset: jax.Array | None  # [..., G, N] float16, asym only
    scheme: QScheme = dataclasses.field(metadata=dict(static=True))  # the format
    k: int = dataclasses.field(metadata=dict(static=True))  # logical input features K
    n: int = dataclasses.field(metadata=dict(static=True))  # output features N

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Leading (expert) dimensions."""
        return tuple(self.scale.shape[:-2])

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads for the whole tensor (codes + scales + offsets)."""
        total = self.qweight.size * self.qweight.dtype.itemsize + self.scale.size * 2
        return total + (self.offset.size * 2 if self.offset is not None else 0)


def _pack_chunks(u: jax.Array, bits: int, axis: int) -> jax.Array:
    """Pack unsigned ``bits``-wide codes along ``axis`` (length a multiple of 128) into uint8."""
    v = 8 // bits
    p = CHUNK // v
    u = jnp.moveaxis(u, axis, -1).astype(jnp.uint8)  # [..., Kp]
    lead = u.shape[:-1]
    u = u.reshape(*lead, -1, v, p)  # [..., chunks, j, r]
    out = jnp.zeros((*lead, u.shape[-3], p), jnp.uint8)
    for j in range(v):
        out = out | (u[..., j, :] << (j * bits)).astype(jnp.uint8)
    return jnp.moveaxis(out.reshape(*lead, -1), -1, axis)


def _unpack_chunks(packed: jax.Array, bits: int, axis: int) -> jax.Array:
    """Inverse of ``_pack_chunks``: uint8 codes along ``axis`` (padded length)."""
    v = 8 // bits
    p = CHUNK // v
    b = jnp.moveaxis(packed, axis, -1).astype(jnp.uint8)
    lead = b.shape[:-1]
    b = b.reshape(*lead, -1, p)  # [..., chunks, r]
    mask = (1 << bits) - 1
    parts = [(b >> (j * bits)) & mask for j in range(v)]
    u = jnp.stack(parts, axis=-2).reshape(*lead, -1)  # [..., chunks * v * p]
    return jnp.moveaxis(u, -1, axis)


def _pad_k(a: jax.Array, kp: int, axis: int) -> jax.Array:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, kp - a.shape[axis])
    return jnp.pad(a, pad)


def padded_k(scheme: QScheme, k: int) -> int:
    """K after padding for storage (multiple of 128 for sub-byte codes)."""
    if storage_bits(scheme) < 8:
        return -(-k // CHUNK) * CHUNK
    return k


def pack(qw) -> PackedWeight:
    """``QuantizedWeight`` (codes ``[..., K, N]``) -> ``PackedWeight`` in the kernels' layout."""
    scheme = QScheme.parse(qw.scheme)
    if scheme.w_bits == 16:
        raise ValueError("scheme: w16a16 has no packed form; pass the bf16 weights themselves")
    codes = qw.codes
    if codes.ndim < 2:
        raise ValueError(f"codes: expected [..., K, N], got shape {codes.shape}")
    k, n = codes.shape[-2:]
    scheme.scale_groups(k)  # clear error if group_size does not divide K
    scale = jnp.asarray(qw.scale).astype(jnp.float16)
    offset = None if qw.offset is None else jnp.asarray(qw.offset).astype(jnp.float16)
    if scheme.sym != (offset is None):
        raise ValueError(f"offset: {scheme.name} {'has no' if scheme.sym else 'needs an'} offset")
    bits = storage_bits(scheme)
    kp = padded_k(scheme, k)
    if scheme.fp8:
        qweight = jnp.swapaxes(codes.astype(jnp.float8_e4m3fn), -1, -2)
    elif scheme.weight_only:
        u = jnp.swapaxes(codes.astype(jnp.int32) + code_bias(scheme), -1, -2)  # [..., N, K]
        if bits == 8:
            qweight = u.astype(jnp.uint8)
        else:
            qweight = _pack_chunks(_pad_k(u, kp, -1), bits, axis=-1)
    else:
        c = jnp.swapaxes(codes.astype(jnp.int32), -1, -2)  # [..., N, K]
        if bits == 8:
            qweight = c.astype(jnp.int8)
        else:
            # offset-binary nibbles u = code + 8 (zero padding u = 0 meets x = 0 in the kernel)
            qweight = _pack_chunks(_pad_k(c + 8, kp, -1), bits, axis=-1).view(jnp.int8)
    return PackedWeight(qweight=qweight, scale=scale, offset=offset, scheme=scheme, k=k, n=n)


def unpack_codes(packed: PackedWeight) -> jax.Array:
    """The integer (or fp8) codes ``[..., K, N]`` exactly as ``QuantizedWeight`` holds them."""
    s = packed.scheme
    bits = storage_bits(s)
    if s.fp8:
        return jnp.swapaxes(packed.qweight, -1, -2)
    if s.weight_only:
        u = packed.qweight if bits == 8 else _unpack_chunks(packed.qweight, bits, axis=-1)
        u = jnp.swapaxes(u[..., : packed.k].astype(jnp.int32), -1, -2)
        return (u - code_bias(s)).astype(codes_dtype(s))
    q = packed.qweight
    if bits == 8:
        c = q.astype(jnp.int32)
    else:
        u = _unpack_chunks(q.view(jnp.uint8), bits, axis=-1)[..., : packed.k].astype(jnp.int32)
        c = u - 8
    return jnp.swapaxes(c, -1, -2).astype(jnp.int8)


def unpack(packed: PackedWeight):
    """``PackedWeight`` -> ``QuantizedWeight`` (exact inverse of ``pack``)."""
    offset = None if packed.offset is None else packed.offset.astype(jnp.float32)
    return QuantizedWeight(codes=unpack_codes(packed), scale=packed.scale.astype(jnp.float32),
                           offset=offset, scheme=packed.scheme)


def dequantize_packed(packed: PackedWeight) -> jax.Array:
    """``[..., K, N]`` f32 weights, computed from the packed form alone (codes * scale + offset)."""
    codes = unpack_codes(packed).astype(jnp.float32)
    k = packed.k
    g = packed.scale.shape[-2]
    rep = k // g
    scale = jnp.repeat(packed.scale.astype(jnp.float32), rep, axis=-2)
    w = codes * scale
    if packed.offset is not None:
        w = w + jnp.repeat(packed.offset.astype(jnp.float32), rep, axis=-2)
    return w


def nbytes_of(w) -> int:
    """Bytes of a weight operand (PackedWeight or array)."""
    if isinstance(w, PackedWeight):
        return w.nbytes
    return int(np.prod(w.shape)) * jnp.dtype(w.dtype).itemsize
