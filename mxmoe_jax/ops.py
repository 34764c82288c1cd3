"""Operations shared by the models and the kernels: the grouped matmul of the MoE experts.

``grouped_matmul(x [M, K], w [E, K, N], group_sizes [E]) -> [M, N]``: the rows of ``x`` are sorted
by expert; rows ``[sum(group_sizes[:e]), sum(group_sizes[:e+1]))`` are multiplied by ``w[e]``.
Rows past ``sum(group_sizes)`` (padding) come out as zeros. Accumulation is f32; the result is
cast once to ``out_dtype`` (default: ``x.dtype``).

This module holds the pure-jnp reference (``jax.lax.ragged_dot``) and ``grouped_matmul_tiled``, a
jnp version that the CPU runs instead: XLA's CPU ragged_dot multiplies every row by every expert
(E times the work), while the tiled one visits only row tiles of one expert each (at most
``cdiv(M, block_m) + E`` tiles), about 8x faster for the tiny model's MoE layers. Pallas kernels
plug in behind the same call (``mxmoe_jax.kernels``) without changing the models.
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


def grouped_matmul_tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                         block_m: int = 64, out_dtype=None, precision=None) -> jax.Array:
    """The same product as ``grouped_matmul_reference``, as a scan over expert row tiles.

    Tile table (static length ``cdiv(M, block_m) + E``, computed under jit from ``group_sizes``):
    tile i belongs to expert ``e_i`` and covers rows ``[row0_i, row0_i + block_m)`` clipped to that
    expert's rows; tiles past the last are empty. Each tile is one ``[bm, K] x [K, N]`` dot in f32;
    the rows of a tile outside its expert are masked, then tiles are scatter-added into ``[M, N]``.
    """
    _check(x, w, group_sizes)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    m, k = x.shape
    e, _, n = w.shape
    bm = max(1, min(block_m, m))
    n_tiles = -(-m // bm) + e
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)  # [E] row end of each expert
    starts = ends - gs
    tiles_per = (gs + bm - 1) // bm  # [E]
    tile_end = jnp.cumsum(tiles_per)
    tile_id = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, tile_id, side="right"), e - 1)
    j = tile_id - (tile_end - tiles_per)[tile_expert]  # tile index within its expert
    row0 = starts[tile_expert] + j * bm  # [n_tiles]
    live = tile_id < tile_end[-1]
    x_pad = jnp.concatenate([x, jnp.zeros((bm, k), x.dtype)])  # dynamic_slice never clamps
    w = w.astype(x.dtype) if w.dtype != x.dtype else w

    def tile(_, args):
        ex, r0 = args
        x_blk = jax.lax.dynamic_slice(x_pad, (r0, 0), (bm, k))  # [bm, K]
        return None, jnp.dot(x_blk, w[ex], precision=precision,
                             preferred_element_type=jnp.float32)  # [bm, N] f32

    row0 = jnp.where(live, row0, m)  # empty tiles read padding and are masked below
    _, y = jax.lax.scan(tile, None, (tile_expert, row0))  # [n_tiles, bm, N]
    rows = row0[:, None] + jnp.arange(bm, dtype=jnp.int32)[None, :]  # [n_tiles, bm]
    valid = live[:, None] & (rows < ends[tile_expert][:, None])
    y = jnp.where(valid[..., None], y, 0.0)
    out = jnp.zeros((m + bm, n), jnp.float32).at[rows.reshape(-1)].add(y.reshape(-1, n))
    return out[:m].astype(out_dtype)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   out_dtype=None, precision=None) -> jax.Array:
    """``x [M, K]`` rows grouped by expert times ``w [E, K, N]`` -> ``[M, N]``.

    ``group_sizes [E]`` int32 = rows per expert, in order; their sum may be < M (the tail rows
    are padding and come out as zeros). On the CPU the tiled jnp version runs, elsewhere the
    ragged_dot reference; GPU kernels plug in here.
    """
    if jax.default_backend() == "cpu":
        return grouped_matmul_tiled(x, w, group_sizes, out_dtype=out_dtype, precision=precision)
    return grouped_matmul_reference(x, w, group_sizes, out_dtype=out_dtype, precision=precision)
