"""`fpexact.snap`: rounding to the float16 / float8_e4m3fn grid without a cast, checked against
NumPy's (ml_dtypes') own casts, which round to nearest even and keep subnormals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mxmoe_jax.quant.fpexact import F8_E4M3_BITS, F16_BITS, prev_float, snap, snap_step


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
