"""`fpexact.snap`: rounding to the float16 / float8_e4m3fn grid without a cast, and `widen` /
`narrow` (bfloat16 through the bit patterns), checked against NumPy's (ml_dtypes') own casts,
which round to nearest even and keep subnormals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mxmoe_jax.quant.fpexact import (
    F8_E4M3_BITS,
    F16_BITS,
    narrow,
    prev_float,
    snap,
    snap_step,
    widen,
)


def _values(rng, n, lo_exp, hi_exp):
    mag = rng.uniform(1, 2, n) * 2.0 ** rng.integers(lo_exp, hi_exp, n)
    v = (mag * rng.choice([-1, 1], n)).astype(np.float32)
    v[:50] = 0.0
    return v


def test_snap_to_float16_is_the_ieee_cast():
    rng = np.random.default_rng(0)
    v = _values(rng, 100_000, -27, 15)  # float16 subnormals (< 2^-14) and normals up to 2^15
    want = v.astype(np.float16).astype(np.float32)
    got = np.asarray(jax.jit(lambda a: snap(a, F16_BITS))(v))
    np.testing.assert_array_equal(got, want)
    # every float16 value is a fixed point; ties (midpoints) go to the even neighbour
    grid = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(snap(grid, F16_BITS)), grid)
    mid = (grid[:-1].astype(np.float64) + grid[1:]) / 2
    np.testing.assert_array_equal(np.asarray(snap(mid.astype(np.float32), F16_BITS)),
                                  mid.astype(np.float32).astype(np.float16).astype(np.float32))


def test_snap_floor_and_ceil_bracket_the_value():
    rng = np.random.default_rng(1)
    v = _values(rng, 50_000, -27, 15)
    lo = np.asarray(snap(v, F16_BITS, jnp.floor))
    hi = np.asarray(snap(v, F16_BITS, jnp.ceil))
    for a in (lo, hi):  # on the float16 grid
        np.testing.assert_array_equal(a.astype(np.float16).astype(np.float32), a)
    assert np.all(lo <= v) and np.all(v <= hi)
    # adjacent: nothing of the grid lies strictly between them
    step = np.asarray(snap_step(lo, F16_BITS))
    assert np.all((hi == lo) | (hi - lo <= step))


def test_snap_to_float8_e4m3fn_is_the_cast():
    rng = np.random.default_rng(2)
    v = np.clip(_values(rng, 100_000, -12, 9), -448, 448)
    want = v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(snap(v, F8_E4M3_BITS)), want)


def test_prev_float_is_one_ulp_down():
    v = np.array([1.0, 2.0 ** -20, 3.5, 65504.0], np.float32)
    np.testing.assert_array_equal(np.asarray(prev_float(v)), np.nextafter(v, np.float32(0)))


def test_narrow_to_bfloat16_and_widen_are_the_ieee_casts():
    rng = np.random.default_rng(3)
    v = _values(rng, 100_000, -140, 127)  # bf16 (= f32) subnormals up to near the f32 maximum
    grid = np.arange(0, 0x7F80, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
    mid = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)  # ties to even
    special = np.array([np.inf, -np.inf, np.nan, 3.4e38, -0.0], np.float32)
    for x in (v, grid, mid, -mid, special):
        want = x.astype(ml_dtypes.bfloat16)
        got = np.asarray(jax.jit(lambda a: narrow(a, jnp.bfloat16))(x))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(x)],
                                      want.view(np.uint16)[~np.isnan(x)])
        assert np.all(np.isnan(got.astype(np.float32)) == np.isnan(x))
        np.testing.assert_array_equal(np.asarray(jax.jit(widen)(want)), want.astype(np.float32))
    # a fused round trip keeps the rounding (a cast pair may be deleted inside a GPU fusion);
    # normal values only: XLA's arithmetic flushes f32 subnormals to zero
    v = v[np.abs(v) >= 2.0 ** -100]
    fused = jax.jit(lambda a: widen(narrow(a * 1.0, jnp.bfloat16)) - a)(v)
    np.testing.assert_array_equal(np.asarray(fused),
                                  v.astype(ml_dtypes.bfloat16).astype(np.float32) - v)
    assert narrow(jnp.ones(3), jnp.float16).dtype == jnp.float16  # other dtypes: the plain cast
