"""Dynamic per-token activation quantization: grid, error bound, idempotence, zero rows, and the
exact definition (codes and scales bit for bit in every compilation context)."""

from __future__ import annotations

import jax
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
from mxmoe_jax.quant.fpexact import div_rn
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


# ------------------------------------------------------------------ the definition, bit for bit

def _e4m3_grid() -> np.ndarray:
    """Every finite non-negative float8_e4m3fn value, ascending (f64)."""
    v = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float64)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


def near_ties(seed: int, m: int, k: int, qmax: float, fp8: bool = False) -> np.ndarray:
    """[m, k] f32 rows whose ``x * RN(qmax / amax)`` lands on, or a few ulps either side of, a
    rounding tie: ``.5`` for integer codes, the midpoint of two e4m3 neighbours for FP8. Column 0
    holds ``±amax``, so every row's max|x| is known."""
    rng = np.random.default_rng(seed)
    amax = (rng.uniform(1, 2, m) * 2.0 ** rng.integers(-30, 30, m)).astype(np.float32)
    inv = np.float32(qmax) / amax  # NumPy's f32 division is IEEE: RN(qmax / amax)
    if fp8:
        g = _e4m3_grid()
        mids = (g[:-1] + g[1:]) / 2
        t = rng.choice(mids[(mids > 2**-6) & (mids < qmax)], (m, k))
    else:
        t = rng.integers(0, int(qmax), (m, k)) + 0.5
    x = (t / inv[:, None].astype(np.float64)).astype(np.float32)
    x = (x.view(np.int32) + rng.integers(-2, 3, (m, k)).astype(np.int32)).view(np.float32)
    x = x * rng.choice(np.float32([-1, 1]), (m, k))
    x[:, 0] = amax * rng.choice(np.float32([-1, 1]), m)
    return x


def spec_quantize(x: np.ndarray, scheme: QScheme) -> tuple[np.ndarray, np.ndarray]:
    """The module docstring's definition transcribed to f32 NumPy (per token only)."""
    assert scheme.group_size == -1
    qmax = np.float32(448.0 if scheme.fp8 else scheme.a_qmax)
    amax = np.abs(x).max(axis=1, keepdims=True)
    zero = amax < np.float32(2.0 ** -100)
    safe = np.where(zero, np.float32(1), amax)
    scale = np.where(zero, np.float32(1), safe / qmax)
    inv = np.where(zero, np.float32(0), qmax / safe)
    y = x * inv
    if scheme.fp8:
        codes = np.clip(y, -qmax, qmax).astype(jnp.float8_e4m3fn)
    else:
        codes = np.clip(np.round(y), -qmax, qmax).astype(np.int8)
    return codes, scale


def _bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({1: np.uint8, 4: np.uint32}[a.dtype.itemsize])


def test_div_rn_is_the_ieee_quotient():
    rng = np.random.default_rng(0)
    n = 200_000

    def positives():
        v = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
        v[: n // 8] = np.float32(2.0) ** rng.integers(-60, 60, n // 8)  # significand 1.0
        v[n // 8: n // 4] = np.nextafter(v[n // 8: n // 4], np.float32(np.inf))  # ... and 1 ulp up
        v[n // 4: 3 * n // 8] = np.nextafter(v[n // 4: 3 * n // 8], np.float32(0))  # all ones
        return v

    a, b = positives(), positives()
    b[:1000] = a[:1000]  # quotient exactly 1
    np.testing.assert_array_equal(_bits(jax.jit(div_rn)(a, b)), _bits(a / b))
    for q in (7.0, 127.0, 448.0):
        np.testing.assert_array_equal(_bits(div_rn(q, a)), _bits(np.float32(q) / a))
        np.testing.assert_array_equal(_bits(jax.jit(lambda v, q=q: div_rn(v, q))(a)),
                                      _bits(a / np.float32(q)))


@pytest.mark.parametrize("name", ["w8a8_g-1_sym", "w4a4_g-1_sym", "w8a8_g-1_fp8"])
def test_codes_at_near_ties_follow_the_spec_in_every_context(name):
    """Codes and scales are the spec's bits eagerly, jitted, vmapped, inside a larger fused jit
    (the calibration shortcut's layout) and whatever the batch around a row."""
    scheme = QScheme.parse(name)
    x = near_ties(1, 48, 256, 448.0 if scheme.fp8 else scheme.a_qmax, scheme.fp8)
    want_q, want_s = spec_quantize(x, scheme)
    want_fq = (want_q.astype(np.float32) * want_s).astype(np.float32)

    def quant(v):
        return quantize_activations(v, scheme)

    @jax.jit
    def fused(a, z):  # an [E, C, D] group input computed inside the jit, as calibration's
        g = (a + z).reshape(4, 12, 256)
        return fake_quant_activations(g, scheme).reshape(48, 256) * 1.0

    big = np.concatenate([near_ties(2, 13, 256, 7.0), x, x[::-1]])  # other rows around x
    contexts = {
        "eager": quant(x),
        "jit": jax.jit(quant)(x),
        "vmap": jax.tree.map(lambda a: a[:, 0], jax.jit(jax.vmap(lambda r: quant(r[None])))(x)),
        "batched": jax.tree.map(lambda a: a[13:61], jax.jit(quant)(big)),
    }
    for ctx, (q, s) in contexts.items():
        np.testing.assert_array_equal(_bits(s), _bits(want_s), err_msg=ctx)
        np.testing.assert_array_equal(_bits(q), _bits(want_q), err_msg=ctx)
    np.testing.assert_array_equal(_bits(fused(x, np.zeros_like(x))), _bits(want_fq))


def test_zero_threshold():
    x = np.zeros((4, 64), np.float32)
    x[1, 5] = 2.0 ** -101  # below 2^-100: an all-zero row
    x[2, 5] = -(2.0 ** -100)  # the smallest row quantized normally
    x[3] = np.linspace(-3, 3, 64)
    for name in ("w8a8_g-1_sym", "w8a8_g-1_fp8"):
        q, s = quantize_activations(x, name)
        q = np.asarray(q).astype(np.float32)
        assert np.all(np.asarray(s)[:2] == 1) and np.all(q[:2] == 0)
        qmax = 448 if "fp8" in name else 127
        assert q[2, 5] == -qmax and np.sum(q[2] != 0) == 1
        assert float(s[2, 0]) == np.float32(2.0 ** -100) / np.float32(qmax)
