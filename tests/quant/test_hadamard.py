"""Hadamard construction (Sylvester x Paley) for every size the families need, and the transform."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxmoe_jax.quant import hadamard

# hidden / intermediate sizes of the five families, the tiny model and the fixtures
NEEDED = (2048, 4096, 3584, 1408, 14336, 2560, 192, 768, 256, 5632, 2816, 20480, 10944, 1024,
          64, 96, 48, 32)
DENSE_CHECK = tuple(n for n in NEEDED if n <= 2816)  # larger: via the transform test


@pytest.mark.parametrize("n", DENSE_CHECK)
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard.hadamard_matrix(n)
    assert set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", NEEDED)
def test_transform_is_orthogonal(n):
    """Without forming H: x Q keeps norms and x Q Q^T = x (checks the large sizes too)."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n))
    s = hadamard.random_signs(n, seed=1)
    y = hadamard.rotate_right(x, s)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    np.testing.assert_allclose(hadamard.rotate_right_t(y, s), x, atol=1e-10)
    b, _ = hadamard.factor(n)
    if b > 1:  # every output mixes every input: no coordinate passes through unchanged
        e0 = np.zeros(n)
        e0[0] = 1
        assert np.count_nonzero(np.abs(hadamard.rotate_right(e0, s)) > 0) == n


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.sampled_from([12, 20, 28, 36, 44, 48, 96, 192, 1408]), seed=st.integers(0, 1000))
def test_fast_transform_matches_dense(n, seed):
    s = hadamard.random_signs(n, seed)
    x = np.random.default_rng(seed).standard_normal((2, n))
    q = hadamard.orthogonal(n, s)
    np.testing.assert_allclose(hadamard.rotate_right(x, s), x @ q, atol=1e-10)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)


def test_factors_and_errors():
    assert hadamard.factor(1408) == (44, 32)
    assert hadamard.factor(14336) == (28, 512)
    assert hadamard.factor(3584) == (28, 128)
    assert hadamard.factor(2560) == (20, 128)
    assert hadamard.factor(2048) == (1, 2048)
    for bad in (6, 92, 0):
        with pytest.raises(ValueError, match="n:"):
            hadamard.factor(bad)
    # signs are reproducible from the seed and differ between streams
    a = hadamard.random_signs(64, 3)
    np.testing.assert_array_equal(a, hadamard.random_signs(64, 3))
    assert not np.array_equal(a, hadamard.random_signs(64, 3, stream=1))


def test_jax_transform_matches_numpy():
    import jax.numpy as jnp

    s = hadamard.random_signs(192, 0)
    x = np.random.default_rng(0).standard_normal((4, 192)).astype(np.float32)
    got = np.asarray(hadamard.rotate_right(jnp.asarray(x), s, jnp))
    np.testing.assert_allclose(got, hadamard.rotate_right(x.astype(np.float64), s), atol=1e-5)
