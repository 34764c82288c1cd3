"""Packed layouts: exact round trip for every scheme, and the documented bit positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxmoe_jax.quant import packing
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.rtn import quantize_rtn

SCHEMES = ["w8a16_g-1_asym", "w8a16_g128_sym", "w4a16_g128_asym", "w4a16_g-1_sym",
           "w3a16_g128_asym", "w2a16_g128_asym", "w2a16_g-1_sym",
           "w8a8_g-1_sym", "w4a4_g-1_sym", "w4a4_g128_sym", "w8a8_g-1_fp8"]


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("k", [384])
def test_round_trip_exact(name, k):
    w = jax.random.normal(jax.random.key(k), (3, k, 40))
    qw = quantize_rtn(w, name)
    p = packing.pack(qw)
    back = packing.unpack(p)
    assert back.codes.dtype == qw.codes.dtype
    np.testing.assert_array_equal(np.asarray(back.codes, np.float32),
                                  np.asarray(qw.codes, np.float32))
    np.testing.assert_array_equal(np.asarray(dequantize(back)), np.asarray(dequantize(qw)))
    np.testing.assert_array_equal(np.asarray(packing.dequantize_packed(p)),
                                  np.asarray(dequantize(qw)))


@pytest.mark.parametrize("k", [16, 200])
def test_round_trip_unpadded_k(k):
    """Per-channel sub-byte codes with K not a multiple of 128 are padded and cut back exactly."""
    w = jax.random.normal(jax.random.key(3), (2, k, 24))
    for name in ("w4a16_g-1_asym", "w2a16_g-1_sym", "w4a4_g-1_sym"):
        qw = quantize_rtn(w, name)
        back = packing.unpack(packing.pack(qw))
        np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(qw.codes))


def _one_hot(name, k, n, row, col, code):
    from mxmoe_jax.quant.qtensor import codes_dtype
    from mxmoe_jax.quant.scheme import QScheme

    s = QScheme.parse(name)
    codes = np.zeros((1, k, n), np.int32)
    if not s.sym:
        codes[:] = 0
    codes[0, row, col] = code
    g = s.scale_groups(k)
    return QuantizedWeight(codes=jnp.asarray(codes).astype(codes_dtype(s)),
                           scale=jnp.ones((1, g, n)),
                           offset=None if s.sym else jnp.zeros((1, g, n)), scheme=s)


def test_layout_w4a16_bit_positions():
    """K index 128 + 64 + 5 (chunk 1, second half) lands in the high nibble of byte 64 + 5."""
    p = packing.pack(_one_hot("w4a16_g-1_asym", 256, 8, 128 + 64 + 5, 3, 11))
    q = np.asarray(p.qweight)
    assert q.shape == (1, 8, 128) and q.dtype == np.uint8  # [E, N, K/2], K-major
    assert q[0, 3, 64 + 5] == 11 << 4
    assert np.count_nonzero(q) == 1


def test_layout_w2a16_bit_positions():
    """2-bit: K index 96 + 7 is slice j=3 of chunk 0, bits 6..7 of byte 7; sym bias 2."""
    p = packing.pack(_one_hot("w2a16_g-1_sym", 128, 4, 96 + 7, 1, 1))
    q = np.asarray(p.qweight)
    assert q.shape == (1, 4, 32)
    # every code is stored as u = code + 2; the one-hot code 1 -> 3 at bits 6..7, zeros -> 2
    expect = np.full((4, 32), 0b10101010, np.uint8)
    expect[1, 7] = 0b11101010
    np.testing.assert_array_equal(q[0], expect)


def test_layout_w4a4_k_major_offset_binary():
    p = packing.pack(_one_hot("w4a4_g-1_sym", 128, 4, 64 + 2, 3, -3))
    q = np.asarray(p.qweight).view(np.uint8)
    assert q.shape == (1, 4, 64) and p.qweight.dtype == np.int8  # [E, N, K/2]
    # every code is stored as u = code + 8: zeros -> 0x88; -3 -> 5 in the high nibble
    expect = np.full((4, 64), 0x88, np.uint8)
    expect[3, 2] = 0x58
    np.testing.assert_array_equal(q[0], expect)


def test_pack_rejects_w16():
    with pytest.raises(ValueError, match="w16a16"):
        packing.pack(QuantizedWeight(codes=jnp.zeros((4, 4), jnp.int8), scale=jnp.ones((1, 4)),
                                     offset=None, scheme=packing.QScheme.parse("w16a16")))


def test_nbytes_counts_codes_and_scales():
    p = packing.pack(quantize_rtn(jnp.ones((2, 256, 64)), "w4a16_g128_asym"))
    assert p.nbytes == 2 * 256 * 64 // 2 + 2 * 2 * 64 * 2 * 2


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from([s for s in SCHEMES if not s.endswith("fp8")]),
       e=st.integers(1, 3), k_groups=st.integers(1, 3), n=st.integers(1, 48),
       seed=st.integers(0, 2**31 - 1))
def test_round_trip_exact_on_any_codes(name, e, k_groups, n, seed):
    """Property: any codes on the scheme's grid (not only RTN's) survive pack -> unpack exactly."""
    from mxmoe_jax.quant.qtensor import codes_dtype
    from mxmoe_jax.quant.scheme import QScheme

    s = QScheme.parse(name)
    k = 128 * k_groups
    rng = np.random.default_rng(seed)
    codes = rng.integers(s.qmin, s.qmax + 1, (e, k, n))
    groups = 1 if s.group_size == -1 else k // s.group_size
    scale = rng.uniform(0.01, 1.0, (e, groups, n)).astype(np.float16).astype(np.float32)
    # scales and offsets are float16-representable by contract (QuantizedWeight)
    offset = None if s.sym else (-scale * rng.integers(0, s.qmax + 1, scale.shape)).astype(
        np.float16).astype(np.float32)
    qw = QuantizedWeight(codes=jnp.asarray(codes, codes_dtype(s)), scale=jnp.asarray(scale),
                         offset=None if offset is None else jnp.asarray(offset, jnp.float32),
                         scheme=s)
    back = packing.unpack(packing.pack(qw))
    np.testing.assert_array_equal(np.asarray(back.codes, np.int32), codes)
    np.testing.assert_array_equal(np.asarray(dequantize(back)), np.asarray(dequantize(qw)))
