"""Transposed grouped GEMM (Pallas, Triton backend): ``dw[e] = x[rows of e]^T @ dy[rows of e]``.

The weight gradient of the grouped matmul ``y[t] = x[t] @ w[e(t)]`` (``gmm`` in grouped_gemm.py):
tokens are sorted by expert, ``group_sizes[e]`` rows of ``x [M, K]`` and ``dy [M, N]`` belong to
expert ``e``, and the result is ``dw [E, K, N]``. Rows past ``sum(group_sizes)`` (padding) are
ignored; an expert with no rows gets zeros. Inputs are bf16 (or f16); accumulation is f32 and the
result is cast once at the store (f32 by default, or ``out_dtype``).

Glossary. *block*: the ``[bk, bn]`` piece of one expert's ``dw`` that one program owns; *step*:
``bm`` consecutive rows of that expert, loaded as ``x[rows, kblock] [bm, bk]`` and ``dy[rows,
nblock] [bm, bn]`` and multiplied as ``x_tile^T @ dy_tile`` (the MMA contracts over rows, so the x
tile is the transposed left operand; 16-bit wgmma takes either major order from shared memory).

Grid. One-dimensional, ``E * cdiv(K, bk) * cdiv(N, bn)`` programs; program ``p`` decodes to
(expert slowest, then K block, then N block), so the programs in flight at one time read the same
expert's rows of ``x`` and ``dy`` and those stay in L2. Each program loops over its expert's rows
in steps of ``bm``: the trip count is dynamic (``lax.fori_loop`` with traced bounds lowers to an
``scf.for`` that Triton pipelines), from row offsets computed outside with a cumsum and passed as
int32 inputs. The last step of an expert is partial (row mask); K and N tails are masked only
when ``K % bk`` or ``N % bn`` is non-zero (a mask on the contiguous axis narrows Triton's
vector loads). Every ``dw`` element is stored by exactly one program, so no memset and no atomics:
results are deterministic and identical in interpret mode.

``tgmm_reference`` (bottom) is the pure-jnp twin: one masked f32 ``x^T dy`` per expert.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

with warnings.catch_warnings():
    # The Triton backend is deprecated in JAX 0.11/0.12 but still the fastest path (DESIGN.md).
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu

from .grouped_gemm import _load, _mask2  # noqa: E402  (optional masks, shared with gmm)

# H200-sized defaults (Qwen1.5-MoE: K, N in {2048, 1408}, ~500 rows per expert at 8192 tokens)
DEFAULTS = dict(bk=128, bn=128, bm=32, num_warps=4, num_stages=4)  # H200 sweep: 433 us


def _tgmm_kernel(
    # inputs
    starts_ref, ends_ref, x_ref, dy_ref,
    # outputs
    dw_ref,
    *, k: int, n: int, bk: int, bn: int, bm: int, k_blocks: int, n_blocks: int,
):
    """One ``[bk, bn]`` block of one expert's ``dw``, summed over that expert's rows."""
    pid = pl.program_id(0)
    ex = pid // (k_blocks * n_blocks)
    rest = pid % (k_blocks * n_blocks)
    k0 = (rest // n_blocks) * bk
    n0 = (rest % n_blocks) * bn
    row_start = starts_ref[ex]
    row_end = ends_ref[ex]
    ks = None if k % bk == 0 else (k0 + jnp.arange(bk)) < k  # K tail mask
    ns = None if n % bn == 0 else (n0 + jnp.arange(bn)) < n  # N tail mask

    def body(i, acc):
        r0 = row_start + i * bm
        rows_ok = (r0 + jnp.arange(bm)) < row_end  # the expert's last step is partial
        xa = _load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], _mask2(rows_ok, ks), 0.0)  # [bm, bk]
        dya = _load(dy_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], _mask2(rows_ok, ns), 0.0)  # [bm, bn]
        # x_tile^T @ dy_tile: contract over the rows
        return acc + lax.dot_general(xa, dya, (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)  # [bk, bn] f32

    steps = (row_end - row_start + bm - 1) // bm  # 0 for an empty expert: zeros are stored
    acc = lax.fori_loop(0, steps, body, jnp.zeros((bk, bn), jnp.float32))
    out = dw_ref.at[ex, pl.ds(k0, bk), pl.ds(n0, bn)]
    mask = _mask2(ks, ns)
    if mask is None:
        plgpu.store(out, acc.astype(dw_ref.dtype))
    else:
        plgpu.store(out, acc.astype(dw_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("bk", "bn", "bm", "num_warps", "num_stages",
                                             "interpret", "out_dtype"))
def _tgmm(x, dy, group_sizes, *, bk, bn, bm, num_warps, num_stages, interpret, out_dtype):
    m, k = x.shape
    n = dy.shape[1]
    e = group_sizes.shape[0]
    # clamp to M: rows past M do not exist (a sum(group_sizes) > M would otherwise read past x)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)  # [E]
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])  # [E]
    k_blocks, n_blocks = -(-k // bk), -(-n // bn)
    kernel = functools.partial(_tgmm_kernel, k=k, n=n, bk=bk, bn=bn, bm=bm,
                               k_blocks=k_blocks, n_blocks=n_blocks)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((e, k, n), out_dtype),
        grid=(e * k_blocks * n_blocks,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="tgmm",
    )(starts, ends, x, dy)


def _check_block(name: str, v) -> None:
    if not isinstance(v, int) or v < 16 or v & (v - 1):
        raise ValueError(f"{name}: {v!r} must be a power of two >= 16")


def tgmm(x: jax.Array, dy: jax.Array, group_sizes: jax.Array, *,
         bk: int = DEFAULTS["bk"], bn: int = DEFAULTS["bn"], bm: int = DEFAULTS["bm"],
         num_warps: int = DEFAULTS["num_warps"], num_stages: int = DEFAULTS["num_stages"],
         interpret: bool = False, out_dtype=jnp.float32) -> jax.Array:
    """Pallas ``dw [E, K, N]`` with ``dw[e] = x[rows of e]^T @ dy[rows of e]`` (module docstring).

    ``x [M, K]`` and ``dy [M, N]``: bf16 or f16, the same dtype; ``group_sizes [E]`` int rows per
    expert in order (their sum may be < M: the tail rows are ignored). ``bk``/``bn``: the block
    of ``dw`` per program; ``bm``: rows per step; ``num_warps``/``num_stages``: Triton launch
    parameters. ``out_dtype``: float32 (the f32 accumulator as is), bfloat16 or float16.
    """
    if x.ndim != 2:
        raise ValueError(f"x: expected [M, K], got shape {x.shape}")
    if dy.ndim != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy: expected [M={x.shape[0]}, N], got shape {dy.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x: dtype {x.dtype} must be bfloat16 or float16")
    if dy.dtype != x.dtype:
        raise ValueError(f"dy: dtype {dy.dtype} must equal x's ({x.dtype}); cast it first")
    if group_sizes.ndim != 1 or group_sizes.shape[0] < 1 or not jnp.issubdtype(
            group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes: expected int [E], E >= 1, got {group_sizes.dtype}{group_sizes.shape}")
    for name, v in (("bk", bk), ("bn", bn), ("bm", bm)):
        _check_block(name, v)
    if not isinstance(num_warps, int) or num_warps < 1 or num_warps & (num_warps - 1):
        raise ValueError(f"num_warps: {num_warps!r} must be a power of two")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages: {num_stages!r} must be >= 1")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"out_dtype: {out_dtype} must be float32, bfloat16 or float16")
    (m, k), n, e = x.shape, dy.shape[1], group_sizes.shape[0]
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((e, k, n), out_dtype)
    return _tgmm(x, dy, group_sizes, bk=bk, bn=bn, bm=bm, num_warps=num_warps,
                 num_stages=num_stages, interpret=bool(interpret), out_dtype=out_dtype)


# ---------------------------------------------------------------------------------------------
# reference (pure jnp; no kernel helpers)
# ---------------------------------------------------------------------------------------------
def tgmm_reference(x: jax.Array, dy: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """f32 ``dw[e] = x_e^T dy_e``: per expert, the rows outside it zeroed, one f32 matmul.

    O(E M K N) work and O(M K) memory per expert: for tests and modest shapes.
    """
    x32 = x.astype(jnp.float32)
    dy32 = dy.astype(jnp.float32)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    rows = jnp.arange(x.shape[0], dtype=jnp.int32)

    def one(bounds):
        lo, hi = bounds
        keep = ((rows >= lo) & (rows < hi))[:, None]
        return jnp.dot(jnp.where(keep, x32, 0.0).T, dy32, precision=lax.Precision.HIGHEST)

    return lax.map(one, (starts, ends))  # [E, K, N] f32
