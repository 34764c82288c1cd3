"""Dynamic per-token activation quantization: grid, error bound, idempotence, zero rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxmoe_jax.quant.act import (
    dequantize_activations,
    fake_quant_activations,
    quantize_activations,
)
from mxmoe_jax.quant.scheme import QScheme

INT_SCHEMES = ["w8a8_g-1_sym", "w4a4_g-1_sym", "w4a4_g32_sym", "w4a8_g-1_sym"]
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _acts(seed, m, k, magnitude):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)) * magnitude
    x[:, rng.integers(0, k)] *= 50  # a massive-activation channel, as real residual streams have
    return x.astype(np.float32)


acts_args = dict(
    seed=st.integers(0, 2**31 - 1),
    m=st.sampled_from([1, 5, 16]),
    k=st.sampled_from([32, 64]),
    magnitude=st.sampled_from([1e-4, 1.0, 100.0]),
)


@SETTINGS
@given(name=st.sampled_from(INT_SCHEMES), **acts_args)
def test_int_grid_and_half_step(name, seed, m, k, magnitude):
    scheme = QScheme.parse(name)
    x = _acts(seed, m, k, magnitude)
    codes, scale = quantize_activations(x, scheme)
    gs = k if scheme.group_size == -1 else scheme.group_size
    assert codes.dtype == jnp.int8 and codes.shape == (m, k)
    assert scale.dtype == jnp.float32 and scale.shape == (m, k // gs)
    c = np.asarray(codes).astype(np.int32).reshape(m, k // gs, gs)
    # symmetric grid [-a_qmax, a_qmax], each row/group reaches its end on the side of max|x|
    assert np.all(np.abs(c).max(axis=-1) == scheme.a_qmax)
    # the scale is max|x| / a_qmax (independent statement)
    amax = np.abs(x.astype(np.float64)).reshape(m, k // gs, gs).max(axis=-1)
    np.testing.assert_allclose(np.asarray(scale), amax / scheme.a_qmax, rtol=1e-6)
    err = np.abs(np.asarray(dequantize_activations(codes, scale)) - x)
    half = 0.5 * np.repeat(np.asarray(scale), gs, axis=1)
    assert np.all(err <= half * (1 + 1e-5))


@SETTINGS
@given(name=st.sampled_from(INT_SCHEMES + ["w8a8_g-1_fp8"]), **acts_args)
def test_idempotent(name, seed, m, k, magnitude):
    x = _acts(seed, m, k, magnitude)
    once = np.asarray(fake_quant_activations(x, name))
    twice = np.asarray(fake_quant_activations(once, name))
    # scale = max|x| / qmax is recomputed from a value that is itself qmax * scale (one f32 ulp)
    np.testing.assert_allclose(twice, once, rtol=1e-6, atol=0)


def test_fp8_per_token():
    x = _acts(1, 8, 64, 3.0)
    codes, scale = quantize_activations(x, "w8a8_g-1_fp8")
    assert codes.dtype == jnp.float8_e4m3fn and scale.shape == (8, 1)
    assert np.all(np.abs(np.asarray(codes).astype(np.float32)).max(axis=1) == 448)
    y = np.asarray(dequantize_activations(codes, scale))
    s = np.asarray(scale)
    assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2**-4, s * 2**-10) * 1.0001)


@pytest.mark.parametrize("name", INT_SCHEMES + ["w8a8_g-1_fp8"])
def test_zero_rows_finite_and_bf16(name):
    x = np.zeros((3, 64), np.float32)
    x[1] = np.linspace(-2, 2, 64)
    y = fake_quant_activations(jnp.asarray(x, jnp.bfloat16), name)
    assert y.dtype == jnp.bfloat16
    y = np.asarray(y.astype(jnp.float32))
    assert np.all(np.isfinite(y)) and np.all(y[0] == 0) and np.all(y[2] == 0)


def test_weight_only_is_identity_and_errors():
    x = jnp.ones((2, 3, 64))
    assert fake_quant_activations(x, "w4a16_g128_asym") is x
    assert fake_quant_activations(x, "w4a4_g-1_sym").shape == (2, 3, 64)
    with pytest.raises(ValueError, match="a_bits"):
        quantize_activations(np.ones((2, 64), np.float32), "w4a16_g-1_sym")
    with pytest.raises(ValueError, match="group_size"):
        quantize_activations(np.ones((2, 48), np.float32), "w4a4_g32_sym")
