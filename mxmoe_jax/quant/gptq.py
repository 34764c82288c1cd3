"""GPTQ (Frantar et al. 2022) in JAX: Hessians from streamed routed tokens; one jitted call a layer.

Pure math, no model knowledge (the model-facing part streams each expert's routed inputs into
``hessian_update``). Weights are ``[..., K, N]`` (K input features, quantized one K-row at a time);
``H = X^T X / m`` over the ``m`` tokens an expert saw, ``[..., K, K]``.

Algorithm, per expert (MxMoE's ``gptq.py`` [code] follows the reference GPTQ):

1. Dead inputs (``H_kk == 0``: a channel that is zero on every calibration token) get ``H_kk = 1``.
   The reference GPTQ also zeroes those weight rows; we keep and round them instead (no error
   feedback flows through them because their row of ``H`` is zero), so an expert that saw no
   tokens (``H = 0``) comes out as plain RTN rather than as zeros.
2. Optional act-order: rows in order of decreasing ``H_kk``.
3. Damping ``H += percdamp * mean(diag H) * I``; ``U`` = upper Cholesky factor of ``H^-1``
   (``H^-1 = U^T U``), via Cholesky of ``H``, a triangular solve, and Cholesky again.
4. Rows are quantized in order in blocks of ``block_size``: row ``i`` goes to the grid, its error
   ``(w_i - q_i) / U_ii`` is fed back to the later rows of the block at once (``W_j -= U_ij err_i``)
   and to the rows after the block lazily, one matmul per block.
5. Grid parameters (the canonical grid of ``qtensor.grid_params``, the same as RTN's): per channel,
   from the original weights; with K-groups, either on the fly from the current (error-updated)
   weights of the group when its first row is reached, or ``static_groups`` from the original
   weights. Act-order with K-groups requires static groups, because scales stay per contiguous
   K-group of the original order (what ``QuantizedWeight`` and the kernels hold).

One call quantizes a whole layer: everything is vmapped over a leading expert axis; experts with
different token counts differ only in their Hessians (padded rows are masked out when accumulating).

Precision: the Hessians and the solve run in full f32 on every backend, wherever they are called
from (on the GPU an f32 matmul at default precision is TF32-like). Every product passes
``precision=HIGHEST``, and the jitted bodies are traced under
``jax.default_matmul_precision("highest")``, so a product traced inside them without an explicit
precision (e.g. in a JAX linear-algebra helper) is HIGHEST too; the Cholesky factorizations are
LAPACK/cuSOLVER ``potrf`` and the triangular solves XLA's (HIGHEST where XLA expands them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from mxmoe_jax.quant.qtensor import QuantizedWeight, codes_dtype, decode, encode, grid_params
from mxmoe_jax.quant.rtn import check_weight_shape
from mxmoe_jax.quant.scheme import QScheme

HIGHEST = lax.Precision.HIGHEST


def _full_f32():
    """Trace-time default for products without an explicit precision (see the module doc)."""
    return jax.default_matmul_precision("highest")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GPTQConfig:
    """Knobs of the GPTQ solve (the defaults are the reference GPTQ's)."""

    percdamp: float = 0.01  # damping added to diag(H), as a fraction of mean(diag H)
    block_size: int = 128  # K rows per lazy-update block (rounded to a multiple of group_size)
    act_order: bool = False  # quantize rows in order of decreasing H_kk
    static_groups: bool = False  # K-group scales from the original weights, fixed up front

    def __post_init__(self):
        if not 0 <= self.percdamp < 10:
            raise ValueError(f"percdamp: {self.percdamp} must be in [0, 10)")
        if self.block_size <= 0:
            raise ValueError(f"block_size: {self.block_size} must be positive")


# -- Hessian accumulation ------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HessianState:
    """Running per-expert ``sum_m x_m x_m^T`` [E, K, K] f32 and token counts [E] int32."""

    xtx: jax.Array  # [E, K, K] f32 sum of outer products of the tokens routed to each expert
    count: jax.Array  # [E] int32 tokens seen per expert


def hessian_init(e: int, k: int) -> HessianState:
    return HessianState(xtx=jnp.zeros((e, k, k), jnp.float32), count=jnp.zeros((e,), jnp.int32))


@functools.partial(jax.jit, static_argnames="chunk")
def hessian_update(
    state: HessianState, x_sorted: jax.Array, group_sizes: jax.Array, *, chunk: int = 128
) -> HessianState:
    """Add a batch of expert-sorted tokens ``x_sorted`` [M, K] (``group_sizes`` [E] rows each).

    Rows past ``sum(group_sizes)`` (static padding of a jitted dispatch) are ignored. Each
    expert's rows are moved to a ``chunk``-aligned start (at most ``E * (chunk - 1)`` zero rows of
    padding in all), so every ``chunk`` rows belong to one expert: one batched
    ``[chunk, K]^T [chunk, K]`` product per chunk, summed per expert. About the FLOPs of the exact
    per-expert products, where ``ragged_dot_general`` with a ragged contracting dimension falls
    back to E dense masked products off TPU.
    """
    with _full_f32():
        return _hessian_update(state, x_sorted, group_sizes, chunk)


def _hessian_update(state: HessianState, x_sorted, group_sizes, chunk: int) -> HessianState:
    m, k = x_sorted.shape
    e = group_sizes.shape[0]
    gsz = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gsz)
    starts = ends - gsz
    padded = -(-gsz // chunk) * chunk
    pstarts = jnp.cumsum(padded) - padded
    per_step = 32  # chunks per scan step: bounds the [per_step, K, K] products held at once
    n_chunks = -(-(-(-m // chunk) + e) // per_step) * per_step
    rows = jnp.arange(m, dtype=jnp.int32)
    expert = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), e - 1)  # [M]
    dest = pstarts[expert] + rows - starts[expert]
    dest = jnp.where(rows < ends[-1], dest, n_chunks * chunk)  # dropped: beyond the groups
    xp = jnp.zeros((n_chunks * chunk, k), jnp.float32).at[dest].set(
        x_sorted.astype(jnp.float32), mode="drop")
    chunk_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_chunks) * chunk,
                                    side="right")  # [n_chunks]; == E for trailing empty chunks

    def step(xtx, inputs):
        xc, ids = inputs  # [per_step, chunk, K], [per_step]
        grams = jnp.einsum("bck,bcl->bkl", xc, xc, precision=HIGHEST)
        return xtx + jax.ops.segment_sum(grams, ids, num_segments=e), None  # drops id E

    xtx, _ = lax.scan(step, state.xtx, (xp.reshape(-1, per_step, chunk, k),
                                        chunk_expert.reshape(-1, per_step)))
    return HessianState(xtx=xtx, count=state.count + gsz)


@jax.jit
def hessian_update_padded(state: HessianState, x_eck: jax.Array, counts: jax.Array) -> HessianState:
    """Add tokens given padded per expert, ``x_eck`` [E, C, K] with ``counts`` [E] valid rows."""
    mask = jnp.arange(x_eck.shape[1])[None, :] < counts[:, None]  # [E, C]
    x = jnp.where(mask[..., None], x_eck.astype(jnp.float32), 0.0)
    with _full_f32():
        xtx = jnp.einsum("eck,ecl->ekl", x, x, precision=HIGHEST)
    return HessianState(xtx=state.xtx + xtx, count=state.count + counts.astype(jnp.int32))


def hessian_finalize(state: HessianState) -> jax.Array:
    """Mean ``x x^T`` per expert [E, K, K] (all zeros for an expert that saw no token)."""
    return state.xtx / jnp.maximum(state.count, 1).astype(jnp.float32)[:, None, None]


# -- the solve -----------------------------------------------------------------------------------


def _block_and_group(k: int, group_size: int, cfg: GPTQConfig) -> tuple[int, int]:
    """(block size, rows per parameter group inside a block) for a K-row weight."""
    if group_size == -1:
        return cfg.block_size, cfg.block_size
    return group_size * max(1, cfg.block_size // group_size), group_size


@dataclasses.dataclass(frozen=True)
class _Grid:
    """QScheme stand-in inside the jitted solve, with the grid bounds as traced values: every bit
    width with the same (sym, fp8, group_size) shares one compilation."""

    qmin: jax.Array  # f32 scalar
    qmax: jax.Array  # f32 scalar
    sym: bool
    fp8: bool
    group_size: int
    w_bits: int = 0  # not 16 (qtensor.codes_dtype reads it)


def _gptq_one(w: jax.Array, h: jax.Array, bounds: jax.Array, *, layout: tuple[bool, bool, int],
              cfg: GPTQConfig):
    """One expert: w [K, N], h [K, K], bounds [qmin, qmax] ->
    (codes [K, N] f32, scale [G, N], offset [G, N])."""
    sym, fp8, group_size = layout
    scheme = _Grid(qmin=bounds[0], qmax=bounds[1], sym=sym, fp8=fp8, group_size=group_size)
    k, n = w.shape
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    grouped = scheme.group_size != -1
    on_the_fly = grouped and not cfg.static_groups
    gs = scheme.group_size if grouped else k
    n_groups = k // gs
    block, rows_per_group = _block_and_group(k, group_size, cfg)
    kp = -(-k // block) * block

    # Parameters fixed up front (per channel, or static groups) come from the original weights.
    wg = w.reshape(n_groups, gs, n)
    s_fixed, o_fixed = grid_params(wg.min(axis=1), wg.max(axis=1), scheme)  # [G, N]
    if o_fixed is None:
        o_fixed = jnp.zeros_like(s_fixed)

    diag = jnp.diagonal(h)
    h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))  # dead inputs (see module docstring)
    if cfg.act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w = w[perm]
        h = h[perm][:, perm]
    else:
        perm = jnp.arange(k)
    h = h + cfg.percdamp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=jnp.float32)
    # Pad K to whole blocks with independent zero rows (identity in H): they take no error and
    # give none, so the real rows are quantized exactly as without padding.
    w = jnp.pad(w, ((0, kp - k), (0, 0)))
    h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag(
        jnp.where(jnp.arange(kp) >= k, 1.0, 0.0))
    gidx = jnp.pad(perm // gs, (0, kp - k))  # group of each (permuted) row, for fixed params

    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(kp, dtype=jnp.float32))
    u = jnp.linalg.cholesky(hinv).T  # upper: H^-1 = U^T U

    n_groups_p = kp // gs if grouped else 1
    sym = scheme.sym  # fp8 counts as sym: no offset

    def block_body(b, carry):
        w_all, q_all, s_all, o_all = carry
        i1 = b * block
        w1 = lax.dynamic_slice(w_all, (i1, 0), (block, n))  # [B, N] current weights
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))  # [B, B]
        if not on_the_fly and n_groups > 1:  # this block's rows' fixed parameters, gathered once
            g_blk = lax.dynamic_slice(gidx, (i1,), (block,))
            s_blk, o_blk = s_fixed[g_blk], o_fixed[g_blk]  # [B, N]

        def group_body(g, c):
            w1, q1, e1, s_all, o_all = c
            r0 = g * rows_per_group
            if on_the_fly:
                grp = lax.dynamic_slice(w1, (r0, 0), (rows_per_group, n))
                s_g, o_g = grid_params(grp.min(axis=0), grp.max(axis=0), scheme)
                o_g = jnp.zeros_like(s_g) if o_g is None else o_g
                gi = (i1 + r0) // gs
                s_all = lax.dynamic_update_slice(s_all, s_g[None], (gi, 0))
                o_all = lax.dynamic_update_slice(o_all, o_g[None], (gi, 0))

            def row_body(r, c2):
                w1, q1, e1 = c2
                i = r0 + r
                if on_the_fly:
                    s, o = s_g, o_g
                elif n_groups == 1:  # per channel: no per-row gather
                    s, o = s_fixed[0], o_fixed[0]
                else:  # static groups (act-order permutes rows across groups)
                    s, o = s_blk[i], o_blk[i]
                row = w1[i]
                q = encode(row, s, None if sym else o, scheme)
                err = (row - decode(q, s, None if sym else o)) / u1[i, i]
                # feed the error to the later rows of the block (U is upper triangular)
                w1 = w1 - u1[i][:, None] * err[None, :]
                q1 = q1.at[i].set(q.astype(jnp.float32))
                e1 = e1.at[i].set(err)
                return w1, q1, e1

            w1, q1, e1 = lax.fori_loop(0, rows_per_group, row_body, (w1, q1, e1))
            return w1, q1, e1, s_all, o_all

        zeros = jnp.zeros((block, n), jnp.float32)
        _, q1, e1, s_all, o_all = lax.fori_loop(
            0, block // rows_per_group, group_body, (w1, zeros, zeros, s_all, o_all))
        # lazy update of every later row; rows of this block and before are done (U upper)
        u_rows = lax.dynamic_slice(u, (i1, 0), (block, kp))  # [B, Kp]
        w_all = w_all - jnp.einsum("bk,bn->kn", u_rows, e1, precision=HIGHEST)
        q_all = lax.dynamic_update_slice(q_all, q1, (i1, 0))
        return w_all, q_all, s_all, o_all

    init = (w, jnp.zeros((kp, n), jnp.float32), jnp.zeros((n_groups_p, n), jnp.float32),
            jnp.zeros((n_groups_p, n), jnp.float32))
    _, q_all, s_all, o_all = lax.fori_loop(0, kp // block, block_body, init)

    codes = q_all[:k]
    if cfg.act_order:
        codes = jnp.zeros_like(codes).at[perm].set(codes)
    if on_the_fly:
        return codes, s_all[:n_groups], o_all[:n_groups]
    return codes, s_fixed, o_fixed


@functools.partial(jax.jit, static_argnames=("layout", "cfg"))
def _gptq(w, h, bounds, layout, cfg):
    fn = functools.partial(_gptq_one, layout=layout, cfg=cfg)
    for _ in range(w.ndim - 2):
        fn = jax.vmap(fn, in_axes=(0, 0, None))
    with _full_f32():
        return fn(w, h, bounds)


def gptq_quantize(
    w: jax.Array, h: jax.Array, scheme: QScheme | str, cfg: GPTQConfig | None = None
) -> QuantizedWeight:
    """GPTQ-quantize ``w`` [..., K, N] given Hessians ``h`` [..., K, K] (e.g. ``hessian_finalize``).

    Leading axes (experts) are vmapped: one call quantizes a whole layer's stacked experts.
    """
    scheme = QScheme.parse(scheme)
    cfg = cfg or GPTQConfig()
    if scheme.w_bits == 16:
        raise ValueError("scheme: w16a16 is not quantized")
    check_weight_shape(tuple(w.shape), scheme)
    k = w.shape[-2]
    if tuple(h.shape) != (*w.shape[:-2], k, k):
        raise ValueError(f"h: expected shape {(*w.shape[:-2], k, k)} for weights {tuple(w.shape)},"
                         f" got {tuple(h.shape)}")
    if cfg.act_order and scheme.group_size != -1 and not cfg.static_groups:
        raise ValueError("static_groups: act_order with K-groups needs static_groups=True "
                         "(scales stay per contiguous K-group)")
    bounds = jnp.asarray([0.0, 0.0] if scheme.fp8 else [scheme.qmin, scheme.qmax], jnp.float32)
    codes, scale, offset = _gptq(jnp.asarray(w), jnp.asarray(h), bounds,
                                 (scheme.sym, scheme.fp8, scheme.group_size), cfg)
    return QuantizedWeight(codes=codes.astype(codes_dtype(scheme)), scale=scale,
                           offset=None if scheme.sym else offset, scheme=scheme)
