"""RTN weight quantization: grid, error bound, idempotence, edge cases, and a NumPy reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.rtn import fake_quant_weight, quantize_rtn
from mxmoe_jax.quant.scheme import QScheme

INT_SCHEMES = [
    f"w{w}a16_g{g}_{k}" for w in (2, 3, 4, 8) for g in (-1, 32) for k in ("sym", "asym")
] + ["w8a8_g-1_sym", "w4a4_g-1_sym", "w4a4_g32_sym", "w4a8_g-1_sym"]
ALL_SCHEMES = INT_SCHEMES + ["w8a8_g-1_fp8"]

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def _weights(seed: int, shape, magnitude: float, dist: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        w = rng.standard_normal(shape)
    elif dist == "uniform":
        w = rng.uniform(-1, 1, shape) + rng.uniform(-2, 2)  # off-centre, for asym
    else:  # heavy tails: the outliers real weights have
        w = rng.standard_t(2, shape)
    return (w * magnitude).astype(np.float32)


F16_TINY = 2.0**-14  # smallest normal float16


def _normal_scales(qw: QuantizedWeight) -> bool:
    """Subnormal float16 scales are coarser than the grid: exact reuse of the grid needs normal
    ones (|w| > ~8e-3 for 8 bits). The half-step bound holds either way."""
    return bool(np.asarray(qw.scale).min() >= F16_TINY)


def _expand(p: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(p, k // p.shape[-2], axis=-2)


weights_args = dict(
    seed=st.integers(0, 2**31 - 1),
    lead=st.sampled_from([(), (3,)]),
    k=st.sampled_from([32, 64, 96]),
    n=st.sampled_from([1, 8, 24]),
    magnitude=st.sampled_from([1e-3, 0.05, 1.0, 30.0]),
    dist=st.sampled_from(["normal", "uniform", "heavy"]),
)


@SETTINGS
@given(name=st.sampled_from(INT_SCHEMES), **weights_args)
def test_error_within_half_step_and_codes_on_grid(name, seed, lead, k, n, magnitude, dist):
    scheme = QScheme.parse(name)
    w = _weights(seed, (*lead, k, n), magnitude, dist)
    qw = quantize_rtn(w, scheme)
    codes = np.asarray(qw.codes).astype(np.int32)
    assert qw.codes.dtype == (jnp.int8 if scheme.sym else jnp.uint8)
    assert codes.min() >= scheme.qmin and codes.max() <= scheme.qmax
    g = 1 if scheme.group_size == -1 else k // scheme.group_size
    assert qw.scale.shape == (*lead, g, n) and qw.scale.dtype == jnp.float32
    assert (qw.offset is None) == scheme.sym
    scale = np.asarray(qw.scale)
    np.testing.assert_array_equal(scale, scale.astype(np.float16).astype(np.float32))
    if qw.offset is not None:
        off = np.asarray(qw.offset)
        np.testing.assert_array_equal(off, off.astype(np.float16).astype(np.float32))
    err = np.abs(np.asarray(dequantize(qw)) - w)
    half_step = 0.5 * _expand(scale, k)
    # f32 arithmetic in (x - offset) / scale adds a few ulps of |x|
    assert np.all(err <= half_step * (1 + 1e-5) + 4e-7 * np.abs(w).max())


@SETTINGS
@given(name=st.sampled_from(INT_SCHEMES), **weights_args)
def test_grid_is_used_fully(name, seed, lead, k, n, magnitude, dist):
    """Sym groups reach +-qmax (on the side of max|x|); asym groups reach both 0 and qmax."""
    scheme = QScheme.parse(name)
    w = _weights(seed, (*lead, k, n), magnitude, dist)
    qw = quantize_rtn(w, scheme)
    assume(_normal_scales(qw))
    gs = k if scheme.group_size == -1 else scheme.group_size
    codes = np.asarray(qw.codes).astype(np.int32).reshape(*lead, k // gs, gs, n)
    if scheme.sym:
        assert np.all(np.abs(codes).max(axis=-2) == scheme.qmax)
    else:
        assert np.all(codes.min(axis=-2) == 0)
        assert np.all(codes.max(axis=-2) == scheme.qmax)


@SETTINGS
@given(name=st.sampled_from(ALL_SCHEMES), **weights_args)
def test_idempotent(name, seed, lead, k, n, magnitude, dist):
    w = _weights(seed, (*lead, k, n), magnitude, dist)
    assume(_normal_scales(quantize_rtn(w, name)))
    once = fake_quant_weight(w, name)
    twice = fake_quant_weight(once, name)
    np.testing.assert_array_equal(np.asarray(twice), np.asarray(once))


def _reference_rtn(w: np.ndarray, scheme: QScheme) -> np.ndarray:
    """Independent NumPy statement of the documented grid (float64 range, float16 rounding)."""
    k, n = w.shape
    gs = k if scheme.group_size == -1 else scheme.group_size
    wg = w.astype(np.float64).reshape(k // gs, gs, n)
    lo, hi = wg.min(axis=1), wg.max(axis=1)

    def up(x):  # smallest float16 >= x
        h = x.astype(np.float16)
        return np.where(h < x, np.nextafter(h, np.float16(np.inf)), h).astype(np.float64)

    def down(x):
        h = x.astype(np.float16)
        return np.where(h > x, np.nextafter(h, np.float16(-np.inf)), h).astype(np.float64)

    if scheme.sym:
        s = up(np.maximum(-lo, hi) / scheme.qmax)
        s[s == 0] = 1
        q = np.clip(np.round(wg / s[:, None]), scheme.qmin, scheme.qmax)
        return (q * s[:, None]).reshape(k, n)
    o = down(lo)
    s = up((hi - o) / scheme.qmax)
    s[s == 0] = 1
    q = np.clip(np.round((wg - o[:, None]) / s[:, None]), 0, scheme.qmax)
    return (q * s[:, None] + o[:, None]).reshape(k, n)


@pytest.mark.parametrize("name", INT_SCHEMES)
def test_matches_numpy_reference(name):
    scheme = QScheme.parse(name)
    w = _weights(7, (64, 48), 0.1, "heavy")
    got = np.asarray(fake_quant_weight(w, scheme))
    want = _reference_rtn(w, scheme)
    # The f32 span hi - offset may differ from f64 by an ulp, moving a scale by one float16 ulp
    # (2^-10 relative); and f32 vs f64 may break a rounding tie differently on a rare element
    # (one step there).
    close = np.isclose(got, want, rtol=0, atol=2**-9 * np.abs(w).max())
    assert close.mean() > 0.999
    step = np.abs(got - want)[~close]
    assert step.size == 0 or step.max() <= np.abs(w).max() / (2 ** (scheme.w_bits - 1) - 1) * 1.01


@pytest.mark.parametrize("name", ALL_SCHEMES)
def test_zero_and_constant_groups_finite(name):
    scheme = QScheme.parse(name)
    k, n = 64, 6
    w = np.zeros((k, n), np.float32)
    w[:, 1] = 3.25  # constant, float16-exact
    w[:, 2] = -0.1234567  # constant, not float16-exact
    w[:, 3] = 1e-30  # constant, below float16's range
    w[: k // 2, 4] = 0.5  # half zero
    w[:, 5] = np.linspace(-1, 1, k)
    qw = quantize_rtn(w, scheme)
    deq = np.asarray(dequantize(qw))
    for a in (qw.scale, qw.offset, deq):
        assert a is None or np.all(np.isfinite(np.asarray(a)))
    assert np.all(np.asarray(qw.scale) > 0)
    np.testing.assert_array_equal(deq[:, 0], 0)
    # constants come back within the grid's resolution: exact for sym multiples of the scale,
    # within float16/fp8 relative precision otherwise
    np.testing.assert_allclose(deq[:, 1:3], w[:, 1:3], rtol=2**-4 if scheme.fp8 else 2**-10)
    assert np.abs(deq[:, 3]).max() <= 1e-7


def test_bad_group_size_and_w16():
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(np.ones((96, 8), np.float32), "w4a16_g64_asym")
    with pytest.raises(ValueError, match="w16a16"):
        quantize_rtn(np.ones((64, 8), np.float32), "w16a16")
    with pytest.raises(ValueError, match=r"\[..., K, N\]"):
        quantize_rtn(np.ones((64,), np.float32), "w4a16_g-1_sym")


def test_fp8_relative_error():
    w = _weights(3, (2, 64, 16), 0.2, "heavy")
    qw = quantize_rtn(w, "w8a8_g-1_fp8")
    assert qw.codes.dtype == jnp.float8_e4m3fn and qw.scale.shape == (2, 1, 16)
    deq = np.asarray(dequantize(qw))
    scale = _expand(np.asarray(qw.scale), 64)
    # e4m3: 3 mantissa bits (relative half-ulp 2^-4); subnormals below 2^-6 have spacing 2^-9
    assert np.all(np.abs(deq - w) <= np.maximum(np.abs(w) * 2**-4, scale * 2**-10) * 1.0001)
    assert np.abs(np.asarray(qw.codes).astype(np.float32)).max() == 448


def test_pytree_roundtrip_and_jit():
    import jax

    qw = quantize_rtn(_weights(0, (4, 64, 8), 1.0, "normal"), "w4a16_g32_asym")
    leaves, tree = jax.tree_util.tree_flatten(qw)
    assert len(leaves) == 3
    again = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(again, QuantizedWeight) and again.scheme == qw.scheme
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(qw)), np.asarray(dequantize(qw)))
