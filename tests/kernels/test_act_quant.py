"""Activation-quantization kernel vs the quantization core's definition (``quant.act``): the same
codes and scales bit for bit, at random inputs and at inputs built to sit at rounding ties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mxmoe_jax.kernels.pallas.act_quant import quantize_activations, quantize_activations_multi

from mxmoe_jax.quant.act import quantize_activations as reference
from mxmoe_jax.quant.scheme import QScheme

SCHEMES = [("w8a8_g-1_sym", (19, 200)), ("w4a4_g-1_sym", (5, 1408)), ("w4a4_g128_sym", (19, 384)),
           ("w8a8_g-1_fp8", (19, 200))]


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 4: np.uint32}[a.dtype.itemsize])


def _assert_same_bits(got, want):
    (q, s), (qr, sr) = got, want
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape
    np.testing.assert_array_equal(_bits(s), _bits(sr))
    np.testing.assert_array_equal(_bits(q), _bits(qr))


def _near_ties(seed: int, shape: tuple[int, int], scheme: QScheme) -> np.ndarray:
    """Each row/group: ``±amax`` in its first column, the rest where ``x * RN(Q / amax)`` is on
    or a few ulps from a rounding tie (``.5``; for FP8 the midpoint of two e4m3 neighbours)."""
    m, k = shape
    gs = k if scheme.group_size == -1 else scheme.group_size
    rows = m * (k // gs)
    rng = np.random.default_rng(seed)
    qmax = 448.0 if scheme.fp8 else float(scheme.a_qmax)
    amax = (rng.uniform(1, 2, rows) * 2.0 ** rng.integers(-30, 30, rows)).astype(np.float32)
    inv = (np.float32(qmax) / amax).astype(np.float64)
    if scheme.fp8:
        g = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float64)
        g = np.unique(g[np.isfinite(g) & (g >= 0)])
        mids = (g[:-1] + g[1:]) / 2
        t = rng.choice(mids[(mids > 2**-6) & (mids < qmax)], (rows, gs))
    else:
        t = rng.integers(0, int(qmax), (rows, gs)) + 0.5
    x = (t / inv[:, None]).astype(np.float32)
    x = (x.view(np.int32) + rng.integers(-2, 3, x.shape).astype(np.int32)).view(np.float32)
    x = x * rng.choice(np.float32([-1, 1]), x.shape)
    x[:, 0] = amax * rng.choice(np.float32([-1, 1]), rows)
    return x.reshape(m, k)


@pytest.mark.parametrize("name,shape", SCHEMES)
def test_matches_reference(name, shape, interpret):
    x = jax.random.normal(jax.random.key(shape[1]), shape, jnp.float32).astype(jnp.bfloat16)
    x = x.at[3].set(0)  # an all-zero token gets scale 1 and zero codes
    q, s = quantize_activations(x, name, interpret=interpret)
    _assert_same_bits((q, s), reference(x, name))
    assert np.all(np.asarray(q[3], np.float32) == 0) and float(s[3, 0]) == 1.0


@pytest.mark.parametrize("name,shape", SCHEMES)
def test_near_ties_match_reference_bit_for_bit(name, shape, interpret):
    x = _near_ties(shape[1], shape, QScheme.parse(name))
    _assert_same_bits(quantize_activations(x, name, interpret=interpret), reference(x, name))


@pytest.mark.parametrize("name", ["w8a8_g-1_sym", "w4a4_g128_sym", "w8a8_g-1_fp8"])
def test_compiled_kernel_has_no_float_division(triton_ir, name):
    """Triton lowers f32 ``/`` to the approximate div.full.f32: the kernel must not divide."""
    ir = triton_ir(lambda x: quantize_activations(x, name), jax.ShapeDtypeStruct((19, 256),
                                                                              jnp.bfloat16))
    assert len(ir) == 1
    assert "arith.divf" not in ir[0]
    assert "mul.rn.f32" in ir[0] and ("fp8" in name or "cvt.rni.f32.f32" in ir[0])


def test_rejects_bad_group_and_weight_only():
    x = jnp.ones((4, 192), jnp.bfloat16)
    with pytest.raises(ValueError, match="group_size"):
        quantize_activations(x, "w4a4_g48_sym")
    with pytest.raises(ValueError, match="a_bits"):
        quantize_activations(x, "w4a16_g128_asym")


@pytest.mark.parametrize("names,shape", [
    (("w8a8_g-1_sym", "w4a4_g-1_sym", "w8a8_g-1_fp8"), (19, 200)),
    (("w4a4_g128_sym", "w8a8_g128_sym"), (19, 384)),
])
def test_several_formats_in_one_launch_match_the_reference(names, shape, interpret):
    """One launch, one read of ``x``: every format's codes and scales bit for bit the
    reference's, near-tie inputs included (built for the first format)."""
    for x in (jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(jnp.bfloat16),
              _near_ties(2, shape, QScheme.parse(names[0]))):
        got = quantize_activations_multi(x, names, interpret=interpret)
        assert len(got) == len(names)
        for name, codes in zip(names, got, strict=True):
            _assert_same_bits(codes, reference(x, name))


def test_one_launch_quantizes_one_group_layout():
    x = jnp.ones((4, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="one group layout"):
        quantize_activations_multi(x, ["w8a8_g-1_sym", "w4a4_g128_sym"])
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_activations_multi(x, [])
