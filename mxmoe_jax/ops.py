"""The grouped matmul of the MoE experts, for every weight format: one entry, one reference.

``grouped_matmul(x [M, K], w, group_sizes [E]) -> [M, N]``: the rows of ``x`` are sorted by
expert; rows ``[sum(group_sizes[:e]), sum(group_sizes[:e+1]))`` are multiplied by expert ``e``'s
weights. Rows past ``sum(group_sizes)`` (padding) come out as zeros. Accumulation is f32; the
result is cast once to ``out_dtype`` (default: ``x.dtype``).

The weight's type picks the format (as qwix's ``ragged_dot`` takes a plain or quantized operand):

* an array ``[E, K, N]`` (bf16/f16/f32): w16a16;
* a ``QuantizedWeight`` or ``PackedWeight`` (``mxmoe_jax.quant``): its ``scheme``; weight-activation
  schemes (``a_bits < 16``) quantize the rows of ``x`` per token first.

The reference (``grouped_matmul_reference``) is the definition every kernel is held to: weights
dequantized by the quantization core (f32), activations quantized and dequantized by ``quant.act``
for weight-activation schemes, one f32 ragged matmul (``Precision.HIGHEST`` for quantized weights;
for arrays the caller's ``precision``, HIGHEST when none is given and ``x`` is f32, with ``w`` cast
to ``x``'s dtype), a single cast at the end.
On the CPU the ragged matmul runs as a scan over expert row tiles (``ragged_dot_tiled``): XLA's CPU
``ragged_dot`` multiplies every row by every expert (E times the work), the tiled one visits at most
``cdiv(M, block_m) + E`` tiles, about 8x faster for the tiny model's MoE layers. Same numbers up to
the order of f32 sums.

Paths (``IMPLS``), chosen per call by ``impl=`` or for a scope by ``kernel_mode``:

* ``auto`` (default): on an NVIDIA GPU the Pallas kernel where it applies, else the reference.
* ``kernel`` / ``interpret``: the Pallas kernel (``mxmoe_jax.kernels.pallas.grouped_gemm.gmm``),
  compiled (GPU only) or in Pallas interpret mode (CPU tests), where it applies; other calls keep
  the reference.
* ``reference``: always the reference.

The kernel applies to bf16/f16 ``x`` with a bf16/f16/f32 ``out_dtype``, non-empty K, N and E, and
for arrays default precision (``w`` is cast to ``x``'s dtype, as the reference does); f32 inputs
and an explicit ``precision`` (the fp32 parity paths, ``Precision.HIGHEST``) keep the reference.
A ``QuantizedWeight`` is packed at trace time (pack once ahead of time in a model).

Mixed precision: ``grouped_matmul_by_scheme(x, parts, group_sizes)`` takes experts split into
parts of different formats; on the kernel path it is ONE launch of the mixed-precision kernel
(``kernels.pallas.mixed_gemm``; ``launch="per_scheme"``: one launch per part, for comparison), and
``grouped_matmuls`` runs several such calls (routed + shared experts) in one launch. ``epilogue=
"swiglu"`` (every entry) turns fused gate_up outputs into ``silu(gate) * up`` (``apply_epilogue``;
in the kernel's epilogue on the kernel path).

Backward (w16a16 arrays on the kernel path): the kernel is a ``pallas_call`` with no autodiff rule,
so it runs under a ``jax.custom_vjp``. ``dy`` is cast to ``x``'s dtype, ``dx = gmm(dy, w^T)`` (the
forward kernel reading ``w`` K-major in place, ``transpose_w=True``) and ``dw[e] = x_e^T dy_e`` by
``tgmm`` (f32 accumulation, stored in ``w``'s dtype); ``group_sizes`` gets no cotangent. The
gradients are the reference's up to bf16 roundings, not bit for bit.
``kernel_backward("reference")`` brings back the reference's VJP (XLA's ``ragged_dot`` transpose:
~210 of 261 ms of a Qwen1.5-MoE block's forward + backward at 8192 tokens on the H200,
``bench/model_layer.py``) for comparisons.
Quantized weights have no gradient.

``kernel_mode`` and ``kernel_backward`` are JAX config states: thread-local and part of jit's cache
key, so ``with kernel_mode("reference"): forward(model, ids)`` retraces rather than reusing a trace
made under another mode. Nothing is read from the environment.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.quant import act
from mxmoe_jax.quant.fpexact import narrow, widen
from mxmoe_jax.quant.packing import PackedWeight, dequantize_packed, pack
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.scheme import W16A16, QScheme

IMPLS = ("auto", "kernel", "interpret", "reference")
LAUNCHES = ("one", "per_scheme")  # kernel path of grouped_matmul_by_scheme
EPILOGUES = ("none", "swiglu")
BWDS = ("kernel", "reference")  # backward of the kernel path for w16a16 arrays

Weight = jax.Array | QuantizedWeight | PackedWeight


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what}: {value!r} is not one of {choices}")
    return value


class _FallbackState:
    """``enum_state``'s interface (``.value``, call -> context, global set) on a ContextVar."""

    def __init__(self, name: str, default: str):
        import contextvars

        self._var = contextvars.ContextVar(name, default=default)

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


def _make_state(name: str, choices: tuple[str, ...], default: str, doc: str):
    """A JAX config state (thread-local, in jit's cache key).

    ``jax._src.config.enum_state`` is private API; where it is missing or has changed, a plain
    context variable stands in (then an already-jitted function keeps the mode it was traced with).
    """
    try:
        from jax._src import config as jax_config

        return jax_config.enum_state(name, list(choices), default, doc,
                                     include_in_jit_key=True, include_in_trace_context=True)
    except (ImportError, AttributeError, TypeError):
        return _FallbackState(name, default)


_MODE = _make_state("mxmoe_grouped_matmul_impl", IMPLS, "auto",
                    "mxmoe_jax.ops.grouped_matmul path: " + ", ".join(IMPLS))
_BWD = _make_state("mxmoe_grouped_matmul_bwd", BWDS, "kernel",
                   "backward of mxmoe_jax.ops.grouped_matmul's kernel path: " + ", ".join(BWDS))


def get_kernel_mode() -> str:
    """The current ``grouped_matmul`` path (one of ``IMPLS``)."""
    return _MODE.value


def set_kernel_mode(mode: str) -> None:
    """Set the ``grouped_matmul`` path for the whole process (one of ``IMPLS``)."""
    _check_choice(mode, IMPLS, "mode")
    if isinstance(_MODE, _FallbackState):
        _MODE.set_global(mode)
    else:
        jax.config.update("mxmoe_grouped_matmul_impl", mode)


@contextlib.contextmanager
def kernel_mode(mode: str):
    """``with kernel_mode("interpret"): ...``: the ``grouped_matmul`` path inside the block."""
    _check_choice(mode, IMPLS, "mode")
    with _MODE(mode):
        yield


@contextlib.contextmanager
def kernel_backward(bwd: str):
    """``with kernel_backward("reference"): ...``: the kernel path's VJP inside the block."""
    _check_choice(bwd, BWDS, "bwd")
    with _BWD(bwd):
        yield


# ---------------------------------------------------------------------------------- checks

def weight_scheme(w: Weight) -> QScheme:
    """The format of a weight operand: its ``scheme``, or w16a16 for an array."""
    return w.scheme if isinstance(w, QuantizedWeight | PackedWeight) else W16A16


def weight_shape(w: Weight) -> tuple[int, int, int]:
    """``(E, K, N)`` of a weight operand of any type."""
    if isinstance(w, PackedWeight):
        if len(w.lead_shape) != 1:
            raise ValueError(f"grouped_matmul: packed w must stack [E] experts, got lead shape "
                             f"{w.lead_shape}")
        return (w.lead_shape[0], w.k, w.n)
    shape = w.codes.shape if isinstance(w, QuantizedWeight) else w.shape
    if len(shape) != 3:
        raise ValueError(f"grouped_matmul: w must be [E, K, N], got shape {tuple(shape)}")
    return tuple(shape)


def _check(x: jax.Array, w: Weight, group_sizes: jax.Array) -> tuple[int, int, int]:
    if x.ndim != 2:
        raise ValueError(f"grouped_matmul: x must be [M, K], got shape {x.shape}")
    e, k, n = weight_shape(w)
    if x.shape[1] != k:
        raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w has K={k}")
    if group_sizes.shape != (e,):
        raise ValueError(f"grouped_matmul: group_sizes must be [E={e}], "
                         f"got shape {group_sizes.shape}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be integer, got {group_sizes.dtype}")
    return e, k, n


# ---------------------------------------------------------------------------------- reference

def ragged_dot_tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, precision,
                      block_m: int = 64) -> jax.Array:
    """``lax.ragged_dot`` (f32 result) as a scan over expert row tiles (the CPU's path).

    Tile table (static length ``cdiv(M, block_m) + E``, computed under jit from ``group_sizes``):
    tile i belongs to expert ``e_i`` and covers rows ``[row0_i, row0_i + block_m)`` clipped to that
    expert's rows; tiles past the last are empty. Each tile is one ``[bm, K] x [K, N]`` dot in f32;
    the rows of a tile outside its expert are masked, then tiles are scatter-added into ``[M, N]``.
    """
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
    return out[:m]


def _ragged_dot(x, w, group_sizes, *, precision):
    """f32 ``ragged_dot`` of ``x`` and ``w`` (same dtype): tiled on the CPU, XLA's elsewhere."""
    if x.shape[0] == 0 or w.shape[0] == 0:
        return jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
    if w.shape[0] == 1:  # one group (a dense MLP): a plain dot on its rows
        y = jnp.dot(x, w[0], precision=precision, preferred_element_type=jnp.float32)
        live = jnp.arange(x.shape[0]) < group_sizes[0]
        return jnp.where(live[:, None], y, 0.0)
    if jax.default_backend() == "cpu":
        return ragged_dot_tiled(x, w, group_sizes, precision=precision)
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), precision=precision,
                              preferred_element_type=jnp.float32)


def dequantize_weight(w: Weight) -> jax.Array:
    """The f32 values of a quantized weight operand (an array is returned as it is)."""
    if isinstance(w, PackedWeight):
        return dequantize_packed(w)
    if isinstance(w, QuantizedWeight):
        return dequantize(w)
    return w


def apply_epilogue(y: jax.Array, epilogue: str) -> jax.Array:
    """The f32 epilogue of a grouped matmul: ``"swiglu"`` maps fused gate_up outputs ``[M, 2I]``
    to ``silu(gate) * up`` ``[M, I]``; ``"none"`` is the identity."""
    _check_choice(epilogue, EPILOGUES, "epilogue")
    if epilogue == "none":
        return y
    if y.shape[-1] % 2:
        raise ValueError(f"epilogue: swiglu needs fused gate_up weights [E, K, 2I], got "
                         f"N={y.shape[-1]}")
    half = y.shape[-1] // 2
    return jax.nn.silu(y[:, :half]) * y[:, half:]


def grouped_matmul_reference(x: jax.Array, w: Weight, group_sizes: jax.Array, *,
                             out_dtype=None, precision=None, epilogue: str = "none") -> jax.Array:
    """Pure-jnp grouped matmul: the definition (module docstring)."""
    _check(x, w, group_sizes)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    scheme = weight_scheme(w)
    if scheme == W16A16 and not isinstance(w, QuantizedWeight | PackedWeight):
        if precision is None and x.dtype == jnp.float32:
            precision = jax.lax.Precision.HIGHEST  # f32 means f32 (no TF32 on GPUs)
        y = _ragged_dot(x, w.astype(x.dtype) if w.dtype != x.dtype else w, group_sizes,
                        precision=precision)
        return apply_epilogue(y, epilogue).astype(out_dtype)
    xf = widen(x)  # bf16 inputs with their bf16 rounding, on every backend (fpexact)
    if not scheme.weight_only:
        xf = act.dequantize_activations(*act.quantize_activations(xf, scheme))
    y = _ragged_dot(xf, dequantize_weight(w).astype(jnp.float32), group_sizes,
                    precision=jax.lax.Precision.HIGHEST)
    return narrow(apply_epilogue(y, epilogue), out_dtype)


def expert_of_row(group_sizes: jax.Array, m: int) -> jax.Array:
    """``[M]`` int32 expert of each sorted row; ``E`` for padding rows past ``sum(group_sizes)``."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def _by_scheme_reference(x, parts, group_sizes, out_dtype, epilogue="none"):
    """The reference of ``grouped_matmul_by_scheme``: every part dequantized into one f32
    ``[E, K, N]`` stack, each row's activations fake-quantized with its expert's scheme, one f32
    ragged matmul (the same numbers as one reference call per part)."""
    e = group_sizes.shape[0]
    _, k, n = weight_shape(parts[0][0])
    w_full = jnp.zeros((e, k, n), jnp.float32)
    ex = expert_of_row(group_sizes, x.shape[0])  # [M]
    xf = widen(x)
    xq = xf
    for w, experts in parts:
        idx = jnp.asarray(experts, jnp.int32)
        w_full = w_full.at[idx].set(dequantize_weight(w).astype(jnp.float32))
        scheme = weight_scheme(w)
        if not scheme.weight_only:
            rows = jnp.isin(ex, idx)[:, None]
            xq = jnp.where(rows, act.dequantize_activations(*act.quantize_activations(xf, scheme)),
                           xq)
    y = _ragged_dot(xq, w_full, group_sizes, precision=jax.lax.Precision.HIGHEST)
    return narrow(apply_epilogue(y, epilogue), out_dtype)


def grouped_matmul_by_scheme(x: jax.Array, parts, group_sizes: jax.Array, *, out_dtype=None,
                             precision=None, impl: str | None = None, launch: str = "one",
                             epilogue: str = "none") -> jax.Array:
    """``grouped_matmul`` whose experts are split into parts of different formats.

    ``parts``: ``[(w, experts)]``, ``w [n, K, N]`` of any format holding the experts ``experts``
    (ascending; the parts partition ``range(E)``). ``epilogue``: see ``apply_epilogue``.
    Kernel path, ``launch="one"`` (default): ONE launch of the mixed-precision kernel
    (``kernels.pallas.mixed_gemm``), every part a segment with its own tile shape; no gradient.
    ``launch="per_scheme"`` (the comparison): one ``grouped_matmul`` launch per part; the rows are
    permuted so that each part's experts are contiguous (parts in order), each part multiplies the
    ``M`` rows from its offset (its own rows first; the rest are padding and come out zero), the
    results are written back in part order (each write overwrites the zero tail of the one
    before) and unpermuted. Reference: ``_by_scheme_reference``.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    _check_choice(launch, LAUNCHES, "launch")
    _check_choice(epilogue, EPILOGUES, "epilogue")
    e = int(group_sizes.shape[0])
    _check_parts(parts, group_sizes)
    if len(parts) == 1:
        return grouped_matmul(x, parts[0][0], group_sizes, out_dtype=out_dtype,
                              precision=precision, impl=impl, epilogue=epilogue)
    impl = get_kernel_mode() if impl is None else _check_choice(impl, IMPLS, "impl")
    on_kernel = impl in ("kernel", "interpret") or (impl == "auto"
                                                    and jax.default_backend() == "gpu")
    if not on_kernel or not all(_kernel_applies(x, w, out_dtype, precision) for w, _ in parts):
        return _by_scheme_reference(x, parts, group_sizes, out_dtype, epilogue)
    if launch == "one":
        return _mixed(x.dtype, [(x, parts, group_sizes)], out_dtype, impl == "interpret",
                      epilogue)[0]
    m = x.shape[0]
    order = [ex for _, experts in parts for ex in experts]
    perm = None
    if order != list(range(e)):
        rank = np.empty(e + 1, np.int32)
        rank[order] = np.arange(e)
        rank[e] = e  # padding rows last
        perm = jnp.argsort(jnp.asarray(rank)[expert_of_row(group_sizes, m)], stable=True)
        x = x[perm]
    x = jnp.concatenate([x, jnp.zeros_like(x)])  # slices never clamp
    out, off = None, jnp.zeros((), jnp.int32)
    for w, experts in parts:
        gs = group_sizes[np.asarray(experts)]
        y = grouped_matmul(jax.lax.dynamic_slice_in_dim(x, off, m), w, gs, out_dtype=out_dtype,
                           precision=precision, impl=impl, epilogue=epilogue)  # [M, N]
        if out is None:
            out = jnp.zeros((2 * m, y.shape[-1]), y.dtype)
        out = jax.lax.dynamic_update_slice_in_dim(out, y, off, 0)
        off = off + jnp.sum(gs)
    y = out[:m]
    if perm is not None:
        y = jnp.zeros_like(y).at[perm].set(y)
    return y


def _mixed(dtype, calls, out_dtype, interpret, epilogue):
    """``calls`` ``[(x, parts, group_sizes)]`` as the jobs of one ``mixed_launch`` (no gradient)."""
    from mxmoe_jax.kernels.pallas.mixed_gemm import Job, mixed_launch  # lazy: Pallas when used

    jobs = []
    for x, parts, group_sizes in calls:
        assignment = [0] * int(group_sizes.shape[0])
        for i, (_, experts) in enumerate(parts):
            for ex in experts:
                assignment[ex] = i
        ws = tuple(jax.lax.stop_gradient(pack(w) if isinstance(w, QuantizedWeight) else
                                         w.astype(dtype) if isinstance(w, jax.Array) else w)
                   for w, _ in parts)
        jobs.append(Job(x=x, weights_by_scheme=ws, group_sizes=group_sizes,
                        assignment=tuple(assignment)))
    return mixed_launch(jobs, interpret=interpret, out_dtype=out_dtype, epilogue=epilogue)


def grouped_matmuls(calls, *, out_dtype=None, precision=None, impl: str | None = None,
                    epilogue: str = "none") -> list[jax.Array]:
    """Several ``grouped_matmul_by_scheme`` calls ``[(x, parts, group_sizes)]`` (e.g. a layer's
    routed experts and its shared expert): ONE mixed-precision launch on the kernel path when
    every part of every call runs there (inputs of one dtype), else one call each."""
    _check_choice(epilogue, EPILOGUES, "epilogue")
    impl = get_kernel_mode() if impl is None else _check_choice(impl, IMPLS, "impl")
    on_kernel = impl in ("kernel", "interpret") or (impl == "auto"
                                                    and jax.default_backend() == "gpu")
    dtype = calls[0][0].dtype
    out = dtype if out_dtype is None else out_dtype
    if (len(calls) > 1 and on_kernel and all(x.dtype == dtype for x, _, _ in calls)
            and all(_kernel_applies(x, w, out, precision)
                    for x, parts, _ in calls for w, _ in parts)):
        for _, parts, group_sizes in calls:
            _check_parts(parts, group_sizes)
        return _mixed(dtype, calls, out, impl == "interpret", epilogue)
    return [grouped_matmul_by_scheme(x, parts, gs, out_dtype=out_dtype, precision=precision,
                                     impl=impl, epilogue=epilogue) for x, parts, gs in calls]


def _check_parts(parts, group_sizes):
    e = int(group_sizes.shape[0])
    if sorted(ex for _, experts in parts for ex in experts) != list(range(e)):
        raise ValueError(f"parts: their experts must partition range({e})")


# ---------------------------------------------------------------------------------- kernel path

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


def _kernel_applies(x: jax.Array, w: Weight, out_dtype, precision) -> bool:
    """bf16/f16 x, an out_dtype the kernel stores, non-empty K, N and E; arrays: default
    precision; quantized: a scheme the kernels implement."""
    e, k, n = weight_shape(w)
    if not (x.dtype in (jnp.bfloat16, jnp.float16)
            and jnp.dtype(out_dtype) in (jnp.bfloat16, jnp.float16, jnp.float32)
            and k > 0 and n > 0 and e > 0):
        return False
    if isinstance(w, QuantizedWeight | PackedWeight):
        from mxmoe_jax.kernels.pallas.grouped_gemm import supports  # lazy: Pallas only when used

        return supports(w.scheme, k)
    return _default_precision(precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_matmul(x, w, group_sizes, out_dtype, interpret, bwd):
    """The Pallas kernel for w16a16 arrays (w already in x's dtype), with ``bwd``'s VJP."""
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


def _kernel_quantized(x, w: QuantizedWeight | PackedWeight, group_sizes, out_dtype, interpret,
                      epilogue="none"):
    from mxmoe_jax.kernels.pallas import grouped_gemm

    packed = pack(w) if isinstance(w, QuantizedWeight) else w
    return grouped_gemm.gmm(x, jax.lax.stop_gradient(packed), group_sizes, interpret=interpret,
                            out_dtype=out_dtype, epilogue=epilogue)


def grouped_matmul(x: jax.Array, w: Weight, group_sizes: jax.Array, *, out_dtype=None,
                   precision=None, impl: str | None = None, epilogue: str = "none") -> jax.Array:
    """``x [M, K]`` rows grouped by expert times ``w`` (``[E, K, N]`` of any format) -> ``[M, N]``.

    ``group_sizes [E]`` int32 = rows per expert, in order; their sum may be < M (the tail rows
    are padding and come out as zeros). ``impl`` (one of ``IMPLS``; default: the current
    ``kernel_mode``) picks the path, as the module docstring says. ``epilogue="swiglu"``
    (``apply_epilogue``): fused gate_up weights give ``silu(gate) * up`` ``[M, N / 2]``, in the
    kernel's epilogue for quantized weights (arrays: the kernel, then the epilogue in XLA, which
    keeps the VJP).
    """
    impl = get_kernel_mode() if impl is None else _check_choice(impl, IMPLS, "impl")
    _check_choice(epilogue, EPILOGUES, "epilogue")
    _check(x, w, group_sizes)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if impl == "kernel" and jax.default_backend() == "cpu":
        raise ValueError("impl: 'kernel' compiles the Pallas kernel for an NVIDIA GPU and this "
                         "backend is the CPU; use 'interpret' to run the kernel body here")
    if impl == "auto":
        impl = "kernel" if jax.default_backend() == "gpu" else "reference"
    if impl in ("kernel", "interpret") and _kernel_applies(x, w, out_dtype, precision):
        interpret = impl == "interpret"
        if isinstance(w, QuantizedWeight | PackedWeight):
            return _kernel_quantized(x, w, group_sizes, jnp.dtype(out_dtype), interpret, epilogue)
        w = w.astype(x.dtype) if w.dtype != x.dtype else w
        if epilogue != "none":
            y = _kernel_matmul(x, w, group_sizes, jnp.dtype(jnp.float32), interpret, _BWD.value)
            return apply_epilogue(y, epilogue).astype(out_dtype)
        return _kernel_matmul(x, w, group_sizes, jnp.dtype(out_dtype), interpret, _BWD.value)
    return grouped_matmul_reference(x, w, group_sizes, out_dtype=out_dtype, precision=precision,
                                    epilogue=epilogue)
