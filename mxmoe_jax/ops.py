"""Operations shared by the models and the kernels: the grouped matmul of the MoE experts.

``grouped_matmul(x [M, K], w [E, K, N], group_sizes [E]) -> [M, N]``: the rows of ``x`` are sorted
by expert; rows ``[sum(group_sizes[:e]), sum(group_sizes[:e+1]))`` are multiplied by ``w[e]``.
Rows past ``sum(group_sizes)`` (padding) come out as zeros. Accumulation is f32; the result is
cast once to ``out_dtype`` (default: ``x.dtype``).

This module holds the pure-jnp reference (``jax.lax.ragged_dot``) and ``grouped_matmul_tiled``, a
jnp version that the CPU runs instead: XLA's CPU ragged_dot multiplies every row by every expert
(E times the work), while the tiled one visits only row tiles of one expert each (at most
``cdiv(M, block_m) + E`` tiles), about 8x faster for the tiny model's MoE layers.

Paths (``IMPLS``), chosen per call by ``impl=`` or for a scope by ``kernel_mode`` /
``set_kernel_mode`` (or the environment variable ``MXMOE_GROUPED_MATMUL_IMPL``):

* ``auto`` (default): on a GPU the Pallas kernel (``mxmoe_jax.kernels.pallas.gmm``) where it
  applies, else the reference; on the CPU the tiled version.
* ``kernel`` / ``interpret``: the Pallas kernel, compiled (GPU only) or in Pallas interpret mode
  (CPU tests), where it applies; other calls keep the backend's non-kernel path.
* ``reference`` / ``tiled``: always that jnp version.

The kernel applies to bf16/f16 ``x`` (``w`` is cast to ``x``'s dtype, as the reference does) at
default precision with a bf16/f16/f32 ``out_dtype``; f32 inputs and an explicit ``precision`` (the
fp32 parity paths, ``Precision.HIGHEST``) keep the reference. The kernel is a ``pallas_call`` with
no autodiff rule, so it runs under a ``jax.custom_vjp`` whose backward runs Pallas kernels too:
``dy`` is cast to ``x``'s dtype, ``dx = gmm(dy, w^T)`` (the forward kernel reading ``w`` K-major in
place, ``transpose_w=True``; ``x``'s dtype; rows past ``sum(group_sizes)`` get zeros) and ``dw[e] =
x_e^T dy_e`` by ``tgmm`` (``kernels/pallas/tgmm.py``: f32 accumulation, stored in ``w``'s dtype);
``group_sizes`` gets no cotangent. ``impl="interpret"`` runs all three in interpret mode. The
gradients are the reference's up to bf16 roundings (``dy`` rounded to bf16, f32 sums in another
order), not bit for bit: the reference's VJP is XLA's ``ragged_dot`` transpose, f32 GEMMs over every
expert (the models' ``dy`` is f32), which on the H200 took ~210 of 261 ms of a Qwen1.5-MoE block's
forward + backward at 8192 tokens (``bench/model_layer.py``). The environment variable
``MXMOE_GROUPED_MATMUL_BWD=reference`` (read when a function is traced; not part of jit's cache
key) brings back that reference VJP on the kernel path, for comparisons.

The mode is read when a function is traced, and it is part of jit's cache key (a JAX config
state), so ``with kernel_mode("reference"): forward(model, ids)`` retraces rather than reusing a
trace made under another mode.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp

IMPLS = ("auto", "kernel", "interpret", "reference", "tiled")
_ENV = "MXMOE_GROUPED_MATMUL_IMPL"
_BWD_ENV = "MXMOE_GROUPED_MATMUL_BWD"  # backward of the kernel path: "kernel" or "reference"
BWDS = ("kernel", "reference")


def _check_impl(impl: str, what: str = "impl") -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{what}: {impl!r} is not one of {IMPLS}")
    return impl


def _make_mode_state():
    """The current mode as a JAX config state (thread-local, in jit's cache key).

    ``jax._src.config.enum_state`` is private API; where it is missing or has changed, a plain
    context variable stands in (then an already-jitted function keeps the mode it was traced with).
    """
    default = _check_impl(os.environ.get(_ENV, "auto"), _ENV)
    try:
        from jax._src import config as jax_config

        return jax_config.enum_state(
            _ENV.lower(), list(IMPLS), default,
            "mxmoe_jax.ops.grouped_matmul path: " + ", ".join(IMPLS),
            include_in_jit_key=True, include_in_trace_context=True)
    except (ImportError, AttributeError, TypeError):
        import contextvars

        return _FallbackState(contextvars.ContextVar(_ENV.lower(), default=default))


class _FallbackState:
    """``enum_state``'s interface (``.value``, call -> context, global set) on a ContextVar."""

    def __init__(self, var):
        self._var = var

    @property
    def value(self) -> str:
        return self._var.get()

    def set_global(self, mode: str) -> None:
        self._var.set(mode)

    @contextlib.contextmanager
    def __call__(self, mode: str):
        token = self._var.set(mode)
        try:
            yield
        finally:
            self._var.reset(token)


_MODE = _make_mode_state()


def get_kernel_mode() -> str:
    """The current ``grouped_matmul`` path (one of ``IMPLS``)."""
    return _MODE.value


def set_kernel_mode(mode: str) -> None:
    """Set the ``grouped_matmul`` path for the whole process (one of ``IMPLS``)."""
    _check_impl(mode, "mode")
    if isinstance(_MODE, _FallbackState):
        _MODE.set_global(mode)
    else:
        jax.config.update(_ENV.lower(), mode)


@contextlib.contextmanager
def kernel_mode(mode: str):
    """``with kernel_mode("interpret"): ...``: the ``grouped_matmul`` path inside the block."""
    _check_impl(mode, "mode")
    with _MODE(mode):
        yield


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


def _default_precision(precision) -> bool:
    """True for no precision or DEFAULT (per operand too): the kernel's bf16 MMA is that."""
    if precision is None:
        return True
    if isinstance(precision, tuple | list):
        return all(_default_precision(p) for p in precision)
    try:
        return jax.lax.Precision(precision) == jax.lax.Precision.DEFAULT
    except (ValueError, TypeError, KeyError):
        return False


def _kernel_applies(x: jax.Array, w: jax.Array, out_dtype, precision) -> bool:
    """bf16/f16 x, default precision, an out_dtype the kernel stores, non-empty K, N and E."""
    return (x.dtype in (jnp.bfloat16, jnp.float16) and _default_precision(precision)
            and jnp.dtype(out_dtype) in (jnp.bfloat16, jnp.float16, jnp.float32)
            and x.shape[1] > 0 and w.shape[2] > 0 and w.shape[0] > 0)


def _kernel_bwd_choice() -> str:
    """The kernel path's backward from ``MXMOE_GROUPED_MATMUL_BWD`` (default ``kernel``)."""
    bwd = os.environ.get(_BWD_ENV, "kernel")
    if bwd not in BWDS:
        raise ValueError(f"{_BWD_ENV}: {bwd!r} is not one of {BWDS}")
    return bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_matmul(x, w, group_sizes, out_dtype, interpret, bwd):
    """The Pallas kernel (w already in x's dtype); its VJP is ``bwd``'s (module docstring)."""
    from mxmoe_jax.kernels.pallas import grouped_gemm  # lazy: Pallas/Triton only when used

    return grouped_gemm.gmm(x, w, group_sizes, interpret=interpret, out_dtype=out_dtype)


def _kernel_matmul_fwd(x, w, group_sizes, out_dtype, interpret, bwd):
    return _kernel_matmul(x, w, group_sizes, out_dtype, interpret, bwd), (x, w, group_sizes)


def _kernel_matmul_bwd(out_dtype, interpret, bwd, res, dy):
    x, w, group_sizes = res
    if bwd == "reference":
        _, vjp = jax.vjp(
            lambda a, b: grouped_matmul_reference(a, b, group_sizes, out_dtype=out_dtype), x, w)
        dx, dw = vjp(dy)
        return dx, dw, None  # None: integer group_sizes has no cotangent
    from mxmoe_jax.kernels.pallas import grouped_gemm
    from mxmoe_jax.kernels.pallas.tgmm import tgmm

    dy = dy.astype(x.dtype)  # the MMAs take bf16/f16 operands (the models' dy is f32)
    dx = grouped_gemm.gmm(dy, w, group_sizes, interpret=interpret, out_dtype=x.dtype,
                          transpose_w=True)  # [M, K]: dy @ w[e]^T per expert, w read in place
    dw = tgmm(x, dy, group_sizes, interpret=interpret, out_dtype=w.dtype)  # [E, K, N]
    return dx, dw, None


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   out_dtype=None, precision=None, impl: str | None = None) -> jax.Array:
    """``x [M, K]`` rows grouped by expert times ``w [E, K, N]`` -> ``[M, N]``.

    ``group_sizes [E]`` int32 = rows per expert, in order; their sum may be < M (the tail rows
    are padding and come out as zeros). ``impl`` (one of ``IMPLS``; default: the current
    ``kernel_mode``) picks the path, as the module docstring says.
    """
    impl = get_kernel_mode() if impl is None else _check_impl(impl)
    _check(x, w, group_sizes)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    on_cpu = jax.default_backend() == "cpu"
    if impl == "kernel" and on_cpu:
        raise ValueError("impl: 'kernel' compiles the Pallas kernel for an NVIDIA GPU and this "
                         "backend is the CPU; use 'interpret' to run the kernel body here")
    if impl == "auto":
        impl = "kernel" if jax.default_backend() == "gpu" else "tiled" if on_cpu else "reference"
    if impl in ("kernel", "interpret"):
        if _kernel_applies(x, w, out_dtype, precision):
            w = w.astype(x.dtype) if w.dtype != x.dtype else w
            return _kernel_matmul(x, w, group_sizes, jnp.dtype(out_dtype), impl == "interpret",
                                  _kernel_bwd_choice())
        impl = "tiled" if on_cpu else "reference"  # f32 / explicit precision: the jnp path
    if impl == "tiled":
        return grouped_matmul_tiled(x, w, group_sizes, out_dtype=out_dtype, precision=precision)
    return grouped_matmul_reference(x, w, group_sizes, out_dtype=out_dtype, precision=precision)
