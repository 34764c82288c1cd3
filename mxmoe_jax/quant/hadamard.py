"""Hadamard matrices built in code, and the random-sign orthogonal ``Q = diag(s) H / sqrt(n)``.

Every order is ``n = b * 2^a`` with ``H_n = H_b (x) H_2^(x)a`` (Kronecker product; the ``2^a``
part is Sylvester's). The base ``H_b`` is 1 or a Paley matrix:

* Paley I, ``b = q + 1`` for a prime ``q = 3 (mod 4)``: ``H = I + [[0, 1^T], [-1, C]]`` with ``C``
  the Jacobsthal matrix ``C_ij = chi(j - i)`` (``chi`` the quadratic character mod q).
* Paley II, ``b = 2 (q + 1)`` for a prime ``q = 1 (mod 4)``: ``S = [[0, 1^T], [1, C]]`` and
  ``H = S (x) [[1, -1], [-1, -1]] + I (x) [[1, 1], [1, -1]]``.

That covers every size the five families need, with the smallest base found first: 2048, 4096
(Sylvester), 3584 = 28 * 128 (Paley II, q = 13), 1408 = 44 * 32 and 5632 = 44 * 128 (Paley I,
q = 43), 14336 = 28 * 512, 2560 = 20 * 128 (q = 19), 192 = 12 * 16, 768 = 12 * 64 (q = 11), ...
Large ``H_n`` are never formed: ``hadamard_right(x)`` computes ``x @ H_n`` as a dense ``[b, b]``
product followed by ``a`` butterfly stages (``n * (b + a)`` operations per row).

The rotation QuaRot uses is ``Q = diag(s) H_n / sqrt(n)`` with a random sign vector ``s``:
orthogonal (``Q Q^T = I``) and, for ``b > 1``, mixing every channel with every other.
"""

from __future__ import annotations

import functools
import math

import numpy as np


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``C_ij = chi(j - i)`` over GF(q), q prime: +1 on nonzero squares, -1 on non-squares."""
    chi = -np.ones(q, np.int64)
    chi[0] = 0
    chi[(np.arange(1, q) ** 2) % q] = 1
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    c = _jacobsthal(q)
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = c
    return s + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
    c = _jacobsthal(q)
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:] = 1
    s[1:, 0] = 1
    s[1:, 1:] = c
    return (np.kron(s, np.array([[1, -1], [-1, -1]]))
            + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, 1], [1, -1]])))


def _base(b: int) -> str | None:
    """How to build a base Hadamard matrix of order ``b`` (None when we cannot)."""
    if b == 1:
        return "unit"
    if b % 4 == 0 and _is_prime(b - 1) and (b - 1) % 4 == 3:
        return "paley1"
    if b % 4 == 0 and _is_prime(b // 2 - 1) and (b // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def factor(n: int) -> tuple[int, int]:
    """``(b, 2^a)`` with ``n = b * 2^a`` and ``H_b`` constructible, the smallest such ``b``."""
    if n <= 0:
        raise ValueError(f"n: a Hadamard order must be positive, got {n}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        if _base(n // p) is not None:
            return n // p, p
        p //= 2
    raise ValueError(
        f"n: no Hadamard matrix of order {n} from Sylvester x Paley (n = b * 2^a with b = 1, "
        "q + 1 for a prime q = 3 mod 4, or 2(q + 1) for a prime q = 1 mod 4)")


@functools.lru_cache(maxsize=64)
def _base_matrix(b: int) -> np.ndarray:
    kind = _base(b)
    if kind == "unit":
        return np.ones((1, 1))
    if kind == "paley1":
        return _paley1(b - 1).astype(np.float64)
    return _paley2(b // 2 - 1).astype(np.float64)


def hadamard_matrix(n: int) -> np.ndarray:
    """The ``[n, n]`` +-1 matrix ``H_b (x) Sylvester(2^a)`` (float64); ``H H^T = n I``."""
    b, p = factor(n)
    h = _base_matrix(b)
    syl = np.ones((1, 1))
    while syl.shape[0] < p:
        syl = np.block([[syl, syl], [syl, -syl]])
    return np.kron(h, syl)


def _einsum(xp, spec, a, b):
    """``xp.einsum`` in full precision (jnp on a GPU would otherwise use TF32-like passes)."""
    if xp is np:
        return np.einsum(spec, a, b)
    import jax

    return xp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def hadamard_right(x, n: int | None = None, xp=np):
    """``x @ H_n`` over the last axis (``xp`` = numpy or jax.numpy), without forming ``H_n``."""
    n = x.shape[-1] if n is None else n
    b, p = factor(n)
    lead = x.shape[:-1]
    y = x.reshape(*lead, b, p)
    if b > 1:
        hb = xp.asarray(_base_matrix(b), dtype=x.dtype)
        y = _einsum(xp, "...ij,ia->...aj", y, hb)
    h = 1
    while h < p:  # Sylvester butterflies, natural order: y @ (H_2 (x) ... (x) H_2)
        y = y.reshape(*lead, b, p // (2 * h), 2, h)
        y0, y1 = y[..., 0, :], y[..., 1, :]
        y = xp.stack([y0 + y1, y0 - y1], axis=-2)
        h *= 2
    return y.reshape(*lead, n)


def random_signs(n: int, seed: int, stream: int = 0) -> np.ndarray:
    """A reproducible +-1 vector of length ``n`` (float64) for ``(seed, stream)``."""
    rng = np.random.default_rng([seed, stream, n])
    return rng.choice(np.array([-1.0, 1.0]), size=n)


def rotate_right(x, signs, xp=np):
    """``x @ Q`` with ``Q = diag(signs) H_n / sqrt(n)`` over the last axis."""
    n = x.shape[-1]
    s = xp.asarray(signs, dtype=x.dtype)
    return hadamard_right(x * s, n, xp) / math.sqrt(n)


def rotate_right_t(x, signs, xp=np):
    """``x @ Q^T = (x @ H_n^T) * signs / sqrt(n)`` over the last axis (the inverse of
    ``rotate_right``)."""
    n = x.shape[-1]
    s = xp.asarray(signs, dtype=x.dtype)
    b, p = factor(n)
    lead = x.shape[:-1]
    y = x.reshape(*lead, b, p)
    if b > 1:  # H_n^T = H_b^T (x) Sylvester (Sylvester is symmetric)
        hb = xp.asarray(_base_matrix(b).T, dtype=x.dtype)
        y = _einsum(xp, "...ij,ia->...aj", y, hb)
    y = hadamard_right(y.reshape(*lead, b, p), p, xp).reshape(*lead, n)
    return y * s / math.sqrt(n)


def orthogonal(n: int, signs) -> np.ndarray:
    """The dense ``Q = diag(signs) H_n / sqrt(n)`` (float64), for tests and small sizes."""
    return np.asarray(signs, np.float64)[:, None] * hadamard_matrix(n) / math.sqrt(n)
