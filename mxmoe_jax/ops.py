"""Operations shared by the models and the kernels: the grouped matmul of the MoE experts.

``grouped_matmul(x [M, K], w [E, K, N], group_sizes [E]) -> [M, N]``: the rows of ``x`` are sorted
by expert; rows ``[sum(group_sizes[:e]), sum(group_sizes[:e+1]))`` are multiplied by ``w[e]``.
Rows past ``sum(group_sizes)`` (padding) come out as zeros. Accumulation is f32; the result is
cast once to ``out_dtype`` (default: ``x.dtype``).

This module holds the pure-jnp reference (``jax.lax.ragged_dot``); Pallas kernels plug in behind
the same call (``mxmoe_jax.kernels``) without changing the models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"grouped_matmul: x must be [M, K], got shape {x.shape}")
    if w.ndim != 3:
        raise ValueError(f"grouped_matmul: w must be [E, K, N], got shape {w.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w has K={w.shape[1]}")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul: group_sizes must be [E={w.shape[0]}], "
                         f"got shape {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be integer, got {group_sizes.dtype}")


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                             out_dtype=None, precision=None) -> jax.Array:
    """Pure-jnp grouped matmul (f32 accumulation); see the module docstring for the contract."""
    _check(x, w, group_sizes)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    y_mn = jax.lax.ragged_dot(x, w.astype(x.dtype) if w.dtype != x.dtype else w,
                              group_sizes.astype(jnp.int32), precision=precision,
                              preferred_element_type=jnp.float32)  # [M, N] f32
    return y_mn.astype(out_dtype)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   out_dtype=None, precision=None) -> jax.Array:
    """``x [M, K]`` rows grouped by expert times ``w [E, K, N]`` -> ``[M, N]``.

    ``group_sizes [E]`` int32 = rows per expert, in order; their sum may be < M (the tail rows
    are padding and come out as zeros). Today this is the jnp reference; GPU kernels plug in here.
    """
    return grouped_matmul_reference(x, w, group_sizes, out_dtype=out_dtype, precision=precision)
