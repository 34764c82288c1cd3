"""Grouped GEMM for every quantization scheme (Pallas, Triton backend): ``out[t] = x[t] @ W[e(t)]``.

Tokens are sorted by expert; ``group_sizes[e]`` rows of ``x`` go to expert ``e``; rows past
``sum(group_sizes)`` give zeros (as ``lax.ragged_dot``). Inputs and outputs are bf16 (or f16).

Glossary. *tile*: ``bm`` consecutive rows of one expert (the last tile of an expert is partial);
*block*: what one program loads per step, ``[bm, bk]`` of x and ``[bk, bn]`` of W; *chunk*: 128
rows of K packed together (sub-byte codes); *split*: one of ``split_k`` K ranges computed by
separate programs (small token counts need them to fill the GPU).

Tile table. The Triton backend has no scalar prefetch and no dynamic grid, so ``tile_table`` (one
small Pallas launch; ``make_tiles`` is its pure-jnp twin) computes three int32 arrays (tile ->
expert, first row, end row) padded to a static bound ``M // bm + E + 1``; padding tiles have ``first
== end`` and exit at once. Tiles are ordered heaviest first (full tiles before partial ones: the
MxMoE paper's greedy order), and rows past ``sum(group_sizes)`` get tiles of the pseudo-expert ``E``
that store zeros, so every output row is written by the kernel (no memset pass). The grid is
one-dimensional; program ``p`` decodes to (split fastest, then column block, then tile), so the
programs in flight at one time share one expert's weight columns in L2. With ``group_m > 1``
tiles are taken ``group_m`` at a time and the tile index runs fastest within a group, so each
weight column block is read once per group (for very wide N, e.g. Mixtral's 28672, where one
tile's column blocks alone would stream the whole expert).

Operand order. By default the MMA computes ``x_tile @ W_tile``. ``swap_ab`` computes the transpose,
``W_tile^T @ x_tile^T``, so the weight tile is the left operand: on Hopper a wgmma's left operand
may come from registers, so codes unpacked in registers feed the tensor cores directly instead of
taking a register -> shared-memory round trip (w4a4: no shared stores left; 872 -> 647 us on the
H200, bench/NOTES.md). The accumulator is then ``[bn, bm]`` and is transposed once at the end.

Split-K. With ``split_k = S > 1`` every program stores an f32 partial into ``[S, M, N]`` and XLA
sums the partials (one small fused pass); deterministic and identical in interpret mode, unlike
atomics.

Weight layouts (built by ``mxmoe_jax.quant.packing.pack``; its docstring is the byte-level spec):

* bf16 / f16: ``[E, K, N]`` as is.
* weight-only w8/w4/w3/w2 (``a_bits = 16``): unsigned codes ``u = code + bias``, K-major
  ``[E, N, Kp/v]`` uint8 (K-major so that Triton feeds the dot's B operand with ``ldmatrix``, 4
  consecutive K codes per register: with N-major codes it loaded one byte per shared-memory
  instruction, 64 per thread per step, which is what held weight-only decode at ~1 TB/s); sub-byte
  codes packed along K in 128-wide chunks so that bits ``[j*s, (j+1)*s)`` of byte ``r`` hold K
  index ``j * 128/v + r`` of the chunk. A chunk step loads one byte tile and
  unpacks it with a shift and a mask into ``v`` K-slices, each multiplied with its own slice of x
  loaded through the ref (loaded values are never sliced or interleaved). The dot runs on the
  integer codes converted to bf16 (exact), and scale and offset are applied to the f32 partial
  after the dot, per K-group: ``x @ (u * s + z) = (x @ u) * s + rowsum(x) * z`` with
  ``z = offset - bias * s``. So no weight element is multiplied by a scale in registers: the only
  per-element work is unpack + convert (BENCHMARKS.md measured that per-element work is what costs).
  Sub-byte codes skip the int->float convert too: inline PTX ORs each code into the mantissa of
  bf16 128.0 (exactly ``128 + u``), and the 128 joins the bias.
  w3 codes are stored in nibbles (same speed as w4; the 3-bit storage saving is not realised).
* w8a8 / w4a8 / w4a4 int: codes K-major ``[E, N, Kp/v]`` (int8 MMA wants both operands
  K-major); nibbles are offset-binary ``u = code + 8``, unpacked to signed int8 by five 32-bit
  operations per 4 bytes in inline PTX (``_unpack_nibble_i8``).
  Activations are quantized per token (and per K-group for g128) by ``act_quant``; the int32
  partial is scaled by ``x_scale[m] * w_scale[n]`` per K-group (once at the end for g-1).
* fp8 e4m3: ``[E, N, K]`` float8 codes, per-channel weight and per-token activation scales.

Block shapes are powers of two; ragged tails of M, N and K are masked loads/stores.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from mxmoe_jax.quant import packing
from mxmoe_jax.quant.packing import PackedWeight
from mxmoe_jax.quant.scheme import W16A16, QScheme

with warnings.catch_warnings():
    # The Triton backend is deprecated in JAX 0.11/0.12 but still the fastest path here (DESIGN.md).
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu

from . import _triton_fp8, act_quant, tuning  # noqa: E402, F401  (_triton_fp8: see its docstring)
from .tile_config import TileConfig  # noqa: E402


# ---------------------------------------------------------------------------------------------
# tile table
# ---------------------------------------------------------------------------------------------
def num_tiles_bound(m: int, e: int, bm: int) -> int:
    """Static bound on tiles: sum_e ceil(g_e / bm) + ceil(rest / bm) <= M // bm + E + 1."""
    return m // bm + e + 1


def make_tiles(group_sizes: jax.Array, m: int, bm: int, *, experts=None, rest: bool = True,
               with_count: bool = False):
    """Tile table (expert, first row, end row), each int32 ``[num_tiles_bound]``, heaviest first.

    Order: all full tiles (expert order), then the partial last tiles, then padding (``first ==
    end``). Expert ``E`` (one past the last) marks tiles of rows past ``sum(group_sizes)``, which
    store zeros. Built from cumulative sums and one ``[tiles, E]`` comparison (no sort, no
    search loop), so XLA fuses it into a few small kernels.

    ``experts`` (ascending; static, or an int32 array of static length): tile only these
    experts' rows (one scheme of a mixed layer); tile experts are then indices into ``experts``
    (``len(experts)`` for the rest rows), rows stay those of the whole sorted ``[M]``.
    ``rest=False``: no tiles for rows past the sum.
    ``with_count``: also return the number of non-padding tiles (a traced scalar).
    """
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    if experts is not None:
        idx = experts if isinstance(experts, jax.Array) else np.asarray(experts, np.int32)
        gs, starts, ends = gs[idx], starts[idx], ends[idx]
    e = gs.shape[0]
    total = jnp.sum(group_sizes.astype(jnp.int32))
    rest_rows = jnp.maximum(m - total, 0) if rest else jnp.zeros((), jnp.int32)
    gs = jnp.concatenate([gs, rest_rows[None]])  # [e + 1]: the pseudo-expert e
    starts = jnp.concatenate([starts, total[None]])
    ends = jnp.concatenate([ends, (total + rest_rows)[None]])
    full = gs // bm
    part = (gs % bm > 0).astype(jnp.int32)
    cf = jnp.cumsum(full)  # inclusive
    cp = jnp.cumsum(part)
    n_full = cf[-1]
    n_part = cp[-1]
    j = jnp.arange(num_tiles_bound(m, e, bm), dtype=jnp.int32)
    is_full = j < n_full
    jj = jnp.where(is_full, j, j - n_full)
    cum = jnp.where(is_full[:, None], cf[None, :], cp[None, :])  # [T, e + 1]
    expert = jnp.sum((cum <= jj[:, None]).astype(jnp.int32), axis=1)
    valid = j < n_full + n_part
    ex = jnp.minimum(expert, e)
    local = jj - (cf[ex] - full[ex])
    row0 = jnp.where(is_full, starts[ex] + local * bm, starts[ex] + full[ex] * bm)
    row1 = jnp.where(is_full, row0 + bm, ends[ex])
    table = (ex, jnp.where(valid, row0, 0), jnp.where(valid, row1, 0))
    return (*table, n_full + n_part) if with_count else table


def _tile_table_kernel(
    # inputs
    gs_ref,
    # outputs
    ex_ref, r0_ref, r1_ref,
    *, m: int, e: int, bm: int, ep: int, bt: int, n_tiles: int,
):
    """``make_tiles`` in one launch: ``bt`` tile slots per program, experts on ``ep`` lanes."""
    lanes = jnp.arange(ep)
    zero = pl.program_id(0) * 0  # a traced start: the masked block reads past E statically
    gs = plgpu.load(gs_ref.at[pl.ds(zero, ep)], mask=lanes < e, other=0)
    rest = jnp.maximum(m - jnp.sum(gs), 0)
    gs = jnp.where(lanes == e, rest, gs)  # the pseudo-expert E holds rows past the sum
    ends = jnp.cumsum(gs, axis=0)
    starts = ends - gs
    full = gs // bm
    part = (gs % bm > 0).astype(jnp.int32)
    cf = jnp.cumsum(full, axis=0)
    cp = jnp.cumsum(part, axis=0)
    n_full = jnp.sum(full)
    n_part = jnp.sum(part)
    j = pl.program_id(0) * bt + jnp.arange(bt)
    is_full = j < n_full
    jj = jnp.where(is_full, j, j - n_full)
    cum = jnp.where(is_full[:, None], cf[None, :], cp[None, :])  # [bt, ep]
    ex = jnp.sum((cum <= jj[:, None]).astype(jnp.int32), axis=1)
    ex = jnp.minimum(ex, e)
    onehot = lanes[None, :] == ex[:, None]  # [bt, ep]

    def pick(vec):
        return jnp.sum(jnp.where(onehot, vec[None, :], 0), axis=1)

    start_e, full_e = pick(starts), pick(full)
    local = jj - (pick(cf) - full_e)
    row0 = jnp.where(is_full, start_e + local * bm, start_e + full_e * bm)
    row1 = jnp.where(is_full, row0 + bm, pick(ends))
    valid = j < n_full + n_part
    ok = j < n_tiles
    plgpu.store(ex_ref.at[pl.ds(pl.program_id(0) * bt, bt)], ex, mask=ok)
    plgpu.store(r0_ref.at[pl.ds(pl.program_id(0) * bt, bt)], jnp.where(valid, row0, 0), mask=ok)
    plgpu.store(r1_ref.at[pl.ds(pl.program_id(0) * bt, bt)], jnp.where(valid, row1, 0), mask=ok)


def tile_table(group_sizes: jax.Array, m: int, bm: int, *, interpret: bool = False):
    """The tile table of ``make_tiles`` computed by one small Pallas launch (used by ``gmm``)."""
    e = group_sizes.shape[0]
    n_tiles = num_tiles_bound(m, e, bm)
    ep = max(16, 1 << e.bit_length())  # lanes >= E + 1, a power of two
    bt = 32
    kernel = functools.partial(_tile_table_kernel, m=m, e=e, bm=bm, ep=ep, bt=bt,
                               n_tiles=n_tiles)
    out = jax.ShapeDtypeStruct((n_tiles,), jnp.int32)
    return pl.pallas_call(
        kernel, out_shape=(out, out, out), grid=(-(-n_tiles // bt),),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="gmm_tile_table",
    )(group_sizes.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def _dot(a, b, *, trans_b: bool = False):
    """``a @ b`` (or ``a @ b.T``) accumulated in f32, or int32 for integer operands."""
    out = jnp.int32 if jnp.issubdtype(a.dtype, jnp.integer) else jnp.float32
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=out)


# bf16 0x4300 is 128.0 with a zero 7-bit mantissa: OR-ing a code u < 128 into the mantissa gives
# exactly 128 + u, with no int->float convert (converts are what limits weight-only kernels).
_BF16_128 = 128


def _unpack_bf16(p, j: int, bits: int, interpret: bool):
    """bf16 ``128 + u`` for the ``bits``-wide slice ``j`` of each byte of uint8 ``p``.

    Compiled: PTX per 4 bytes (2 prmt, 2 shifts, 2 lop3) through ``elementwise_inline_asm``;
    interpret mode (no inline asm there) computes the same values with jnp.
    """
    mask = (1 << bits) - 1
    shift = j * bits
    if interpret:
        u = (p >> shift) & mask
        return (u.astype(jnp.float32) + _BF16_128).astype(jnp.bfloat16)
    m = f"0x{mask:04x}{mask:04x}"
    shr = f"shr.b32 t0, t0, {shift};\nshr.b32 t1, t1, {shift};\n" if shift else ""
    asm = ("{\n.reg .b32 t0, t1;\n"
           "prmt.b32 t0, $2, 0, 0x4140;\nprmt.b32 t1, $2, 0, 0x4342;\n" + shr +
           f"lop3.b32 $0, t0, {m}, 0x43004300, 0xea;\n"
           f"lop3.b32 $1, t1, {m}, 0x43004300, 0xea;\n}}")
    return plgpu.elementwise_inline_asm(
        asm, args=[p], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, jnp.bfloat16)])[0]


def _unpack_nibble_i8(p, j: int, interpret: bool):
    """Signed int8 code ``u - 8`` of offset-binary nibble ``j`` of each byte of int8 ``p``.

    Compiled: per 4 bytes one AND (plus a shift for the high nibble), then a byte-wise sign
    extension without per-byte arithmetic: ``s = ~u & 0x08`` marks codes below 8, ``s * 0x1E``
    spreads that bit to 0xF0 (no carry between bytes), and ``(u ^ 0x08) | s`` is ``u - 8`` in two's
    complement. So no ``- 8 * rowsum(x)`` correction (which cost an int8 -> int32 convert per
    activation element) is needed.
    """
    if interpret:
        return (((p.astype(jnp.int32) >> (4 * j)) & 0xF) - 8).astype(jnp.int8)
    shr = "shr.b32 t, $1, 4;\nand.b32 t, t, 0x0f0f0f0f;\n" if j else "and.b32 t, $1, 0x0f0f0f0f;\n"
    asm = ("{\n.reg .b32 t, s;\n" + shr +
           "lop3.b32 s, t, 0x08080808, 0, 0x0c;\n"  # ~t & 0x08080808
           "mul.lo.u32 s, s, 0x1e;\n"  # 0x08 -> 0xf0 per byte
           "lop3.b32 $0, t, 0x08080808, s, 0xbe;\n}")  # (t ^ 0x08080808) | s
    return plgpu.elementwise_inline_asm(
        asm, args=[p], constraints="=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(p.shape, jnp.int8)])[0]


def _mm(xa, w_kmajor, swap: bool):
    """``xa [bm, k] @ w_kmajor[bn, k].T`` as ``[bm, bn]``, or as ``[bn, bm]`` if ``swap``."""
    return _dot(w_kmajor, xa, trans_b=True) if swap else _dot(xa, w_kmajor, trans_b=True)


def _orient(bm: int, bn: int, swap: bool):
    """Accumulator shape and the broadcasts of a per-row (token) and per-column vector."""
    if swap:
        return (bn, bm), (lambda v: v[None, :]), (lambda v: v[:, None])
    return (bm, bn), (lambda v: v[:, None]), (lambda v: v[None, :])


def _load(ref, mask, other):
    """``plgpu.load`` with an optional mask (``other`` only applies under a mask)."""
    if mask is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=mask, other=other)


def _mask2(rows, cols):
    """``rows[:, None] & cols[None, :]`` where either may be None (statically all true).

    Masks that shapes make all-true are dropped (no per-step mask arithmetic, and nothing that
    could stop Triton proving a load contiguous); on the H200 shapes this measured no change.
    """
    if rows is None and cols is None:
        return None
    if rows is None:
        return cols[None, :]
    if cols is None:
        return rows[:, None]
    return rows[:, None] & cols[None, :]


def _decode_pid(pid, n_blocks: int, splits: int, n_tiles, group_m: int):
    """Program index -> (tile, column block, split): split fastest, then see
    ``TileConfig.group_m`` (``n_tiles`` may be traced: the valid tiles of a mixed launch)."""
    s = pid % splits
    rest = pid // splits
    if group_m == 1:
        return rest // n_blocks, rest % n_blocks, s
    per_group = group_m * n_blocks
    first = (rest // per_group) * group_m
    size = jnp.minimum(n_tiles - first, group_m)  # the last group may be short
    within = rest % per_group
    return first + within % size, within // size, s


def _store(o_ref, acc, s, r0, rows_ok, n0, bn, cols_ok, splits):
    mask = rows_ok[:, None] & cols_ok[None, :]
    if splits > 1:
        plgpu.store(o_ref.at[s, pl.ds(r0, acc.shape[0]), pl.ds(n0, bn)],
                    acc.astype(o_ref.dtype), mask=mask)
    else:
        plgpu.store(o_ref.at[pl.ds(r0, acc.shape[0]), pl.ds(n0, bn)],
                    acc.astype(o_ref.dtype), mask=mask)


def _wonly_acc(x_ref, w_ref, scale_ref, offset_ref, *, el, r0, rows_ok, c0, offs, s,
               scheme: QScheme, cfg: TileConfig, k: int, n: int, steps: int, step_k: int,
               k_exact: bool, n_exact: bool, interpret: bool, w_kmajor: bool = False):
    """bf16/f16 and weight-only (w8/w4/w3/w2 a16) tile: f32 ``[bm, bn]`` accumulators of rows
    ``r0 + [0, bm)`` (``rows_ok``) times expert ``el``'s columns ``off + c0 + [0, bn)``, one per
    ``off`` in ``offs`` (two for a fused gate_up: the gate and the up half), K split ``s``.

    ``n``: the columns of one part (``c0 + [0, bn)`` is masked to it); ``k_exact``: every step of
    every split lies inside K (no K masks); ``n_exact``: ``n`` is a multiple of ``bn`` (no column
    masks on loads); ``w_kmajor``: bf16/f16 weights arrive as ``[E, N, K]``. The x tiles of a step
    are loaded once for all parts.
    """
    bm, bn = cfg.bm, cfg.bn
    cols_ok = (c0 + jnp.arange(bn)) < n
    cols_ld = None if n_exact else cols_ok  # column mask of loads
    quant = scheme.w_bits != 16
    bits = packing.storage_bits(scheme) if quant else 16
    v = 8 // bits if quant else 1
    grouped = quant and scheme.group_size != -1
    sub = step_k // v  # K rows of one slice
    # sub-byte codes with bf16 activations unpack as 128 + u (see _unpack_bf16)
    magic = quant and bits < 8 and x_ref.dtype == jnp.bfloat16
    ubias = packing.code_bias(scheme) + (_BF16_128 if magic else 0)
    swap = cfg.swap_ab
    acc_shape, row, col = _orient(bm, bn, swap)
    n0s = tuple(off + c0 for off in offs)

    def load_x(k0, width):
        ks = None if k_exact else (k0 + jnp.arange(width)) < k
        return _load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, width)], _mask2(rows_ok, ks), 0.0)

    def load_vec(ref, g, n0):
        return _load(ref.at[el, jnp.int32(g), pl.ds(n0, bn)], cols_ld, 0.0).astype(jnp.float32)

    def load_packed(i, n0):
        """Packed codes ``[bn, sub]`` (K-major) of step ``i`` of this split."""
        step = s * steps + i
        # packed bytes along K of this step
        ok = None if k_exact else (step * sub + jnp.arange(sub)) < w_ref.shape[2]
        return _load(w_ref.at[el, pl.ds(n0, bn), pl.ds(step * sub, sub)], _mask2(cols_ld, ok), 0)

    def scale_offset(g, n0):
        sc = load_vec(scale_ref, g, n0)
        z = -ubias * sc
        if offset_ref is not None:
            z = z + load_vec(offset_ref, g, n0)
        return sc, z

    def body(i, carry):
        accs, rs = carry
        step = s * steps + i
        k0 = step * step_k
        if not quant:
            ks = None if k_exact else (k0 + jnp.arange(step_k)) < k
            xa = load_x(k0, step_k)
            out = []
            for acc, n0 in zip(accs, n0s, strict=True):
                if w_kmajor:  # [bn, step_k] tile of W^T's rows: a K-major right operand
                    wt = _load(w_ref.at[el, pl.ds(n0, bn), pl.ds(k0, step_k)],
                               _mask2(cols_ld, ks), 0.0)
                    out.append(acc + _mm(xa, wt.astype(xa.dtype), swap))
                    continue
                wb = _load(w_ref.at[el, pl.ds(k0, step_k), pl.ds(n0, bn)], _mask2(ks, cols_ld),
                           0.0)
                if swap:
                    out.append(acc + _dot(wb.astype(xa.dtype).T, xa, trans_b=True))
                else:
                    out.append(acc + _dot(xa, wb.astype(xa.dtype)))
            return tuple(out), rs
        # (a manual one-step prefetch of the codes, carried through the loop, measured
        # slower on the H200: 107 -> 171 us at Qwen1.5 decode; see bench/NOTES.md)
        ps = [load_packed(i, n0) for n0 in n0s]
        parts = [jnp.zeros(acc_shape, jnp.float32) for _ in n0s]
        xsum = jnp.zeros((bm,), jnp.float32)
        for jj in range(v):
            xa = load_x(k0 + jj * sub, sub)
            for q, p in enumerate(ps):
                if magic:
                    u = _unpack_bf16(p, jj, bits, interpret)
                else:
                    u = (p if v == 1 else (p >> (jj * bits)) & ((1 << bits) - 1)).astype(xa.dtype)
                parts[q] = parts[q] + _mm(xa, u, swap)  # u: [bn, sub], K-major
            xsum = xsum + jnp.sum(xa.astype(jnp.float32), axis=1)
        if grouped:
            # clamp: a split's steps past K (x and codes masked to 0) read the last group
            g = jnp.minimum(k0 // scheme.group_size, scale_ref.shape[1] - 1)
            out = []
            for acc, part, n0 in zip(accs, parts, n0s, strict=True):
                sc, z = scale_offset(g, n0)
                out.append(acc + part * col(sc) + row(xsum) * col(z))
            return tuple(out), rs
        return tuple(a + p for a, p in zip(accs, parts, strict=True)), rs + xsum

    init = (tuple(jnp.zeros(acc_shape, jnp.float32) for _ in n0s), jnp.zeros((bm,), jnp.float32))
    accs, rs = lax.fori_loop(0, steps, body, init)
    if quant and not grouped:
        out = []
        for acc, n0 in zip(accs, n0s, strict=True):
            sc, z = scale_offset(0, n0)
            out.append(acc * col(sc) + row(rs) * col(z))
        accs = tuple(out)
    return tuple(a.T if swap else a for a in accs)


def _wa_acc(xq_ref, xs_ref, w_ref, ws_ref, *, el, r0, rows_ok, c0, offs, s, scheme: QScheme,
            cfg: TileConfig, k: int, n: int, steps: int, step_k: int, k_exact: bool,
            n_exact: bool, interpret: bool):
    """Weight-activation tile (int8 MMA for w8a8/w4a8/w4a4, fp8 MMA for e4m3): as
    ``_wonly_acc``, from activation codes ``xq`` and per-token (per K-group) scales ``xs``."""
    bm, bn = cfg.bm, cfg.bn
    cols_ld = None if n_exact else (c0 + jnp.arange(bn)) < n
    bits = packing.storage_bits(scheme)
    v = 8 // bits
    sub = step_k // v
    grouped = scheme.group_size != -1
    acc_dtype = jnp.float32 if (scheme.fp8 or grouped) else jnp.int32
    part_dtype = jnp.float32 if scheme.fp8 else jnp.int32
    kw = w_ref.shape[2]  # packed K columns
    swap = cfg.swap_ab
    acc_shape, row, col = _orient(bm, bn, swap)
    n0s = tuple(off + c0 for off in offs)

    fp8_direct = xq_ref.dtype == jnp.float8_e4m3fn  # else fp8 arrives as int8 bits
    other = None if fp8_direct else 0  # masked lanes only reach masked rows/cols

    def load_packed(i, n0):
        step = s * steps + i
        ok = None if k_exact else (step * sub + jnp.arange(sub)) < kw
        return _load(w_ref.at[el, pl.ds(n0, bn), pl.ds(step * sub, sub)], _mask2(cols_ld, ok),
                     other)

    def w_scale(g, n0):
        return _load(ws_ref.at[el, g, pl.ds(n0, bn)], cols_ld, 0.0).astype(jnp.float32)

    def body(i, accs):
        step = s * steps + i
        k0 = step * step_k
        ps = [load_packed(i, n0) for n0 in n0s]
        parts = [jnp.zeros(acc_shape, part_dtype) for _ in n0s]
        for jj in range(v):
            ks = None if k_exact else (k0 + jj * sub + jnp.arange(sub)) < k
            xa = _load(xq_ref.at[pl.ds(r0, bm), pl.ds(k0 + jj * sub, sub)],
                       _mask2(rows_ok, ks), other)
            if scheme.fp8 and not fp8_direct:
                xa = lax.bitcast_convert_type(xa, jnp.float8_e4m3fn)
            for q, p in enumerate(ps):
                if scheme.fp8:
                    wq = p if fp8_direct else lax.bitcast_convert_type(p, jnp.float8_e4m3fn)
                elif v == 1:
                    wq = p
                else:
                    wq = _unpack_nibble_i8(p, jj, interpret)  # signed codes from u = code + 8
                parts[q] = parts[q] + _mm(xa, wq, swap)
        if grouped:
            g = jnp.minimum(k0 // scheme.group_size, ws_ref.shape[1] - 1)
            xsc = plgpu.load(xs_ref.at[pl.ds(r0, bm), g], mask=rows_ok, other=0.0)
            return tuple(acc + part.astype(jnp.float32) * row(xsc) * col(w_scale(g, n0))
                         for acc, part, n0 in zip(accs, parts, n0s, strict=True))
        return tuple(acc + part.astype(acc_dtype) for acc, part in zip(accs, parts, strict=True))

    accs = lax.fori_loop(0, steps, body, tuple(jnp.zeros(acc_shape, acc_dtype) for _ in n0s))
    if not grouped:
        xsc = plgpu.load(xs_ref.at[pl.ds(r0, bm), jnp.int32(0)], mask=rows_ok, other=0.0)
        accs = tuple(acc.astype(jnp.float32) * row(xsc) * col(w_scale(jnp.int32(0), n0))
                     for acc, n0 in zip(accs, n0s, strict=True))
    return tuple(a.T if swap else a for a in accs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Segment:
    """The static description of one group of tiles: one weight stack in one scheme.

    ``gmm`` launches one segment; ``mixed_gemm`` launches several (one per scheme of a layer, the
    shared experts) in one ``pallas_call``. ``refs`` names the positions of the segment's refs in
    the kernel's flat list (``None``: absent): the tile table ``ex``/``r0``/``r1``, the input
    ``x`` (activation codes for weight-activation schemes) and its scales ``xs``, the weights
    ``w`` and their ``scale`` / ``offset``, and the output ``o``.
    """

    scheme: QScheme  # the kernel branch (W16A16 for bf16 weights, also dequantized ones)
    cfg: TileConfig
    k: int
    n: int  # columns of the output (half of the weight's for gated)
    e: int  # experts in the weight stack (tile expert ``e`` = rows past the sum: zeros)
    n_blocks: int
    steps: int
    step_k: int
    k_exact: bool
    n_exact: bool
    w_kmajor: bool = False
    gated: bool = False  # gate_up weights [.., 2n]: store silu(x @ W[:, :n]) * (x @ W[:, n:])
    refs: tuple[tuple[str, int | None], ...] = ()

    def ref(self, refs, name):
        i = dict(self.refs)[name]
        return None if i is None else refs[i]


def make_segment(scheme: QScheme, cfg: TileConfig, *, k: int, n: int, e: int,
                 gated: bool = False, w_kmajor: bool = False, refs=()) -> Segment:
    """A ``Segment`` with the derived static facts (steps, masks) of its shapes."""
    step_k = _step_k(scheme, cfg)
    kp = packing.padded_k(scheme, k) if scheme.w_bits != 16 else k
    total_steps = -(-kp // step_k)
    n_out = n // 2 if gated else n
    return Segment(scheme=scheme, cfg=cfg, k=k, n=n_out, e=e, n_blocks=-(-n_out // cfg.bn),
                   steps=-(-total_steps // cfg.split_k), step_k=step_k, w_kmajor=w_kmajor,
                   gated=gated, refs=tuple(refs),
                   **_exact(k, kp, n_out, step_k, total_steps, cfg))


def run_tile(seg: Segment, refs, *, ex, r0, r1, j, s, splits: int, interpret: bool):
    """One program of ``seg``: tile ``(ex, r0, r1)``, column block ``j``, K split ``s``."""
    bm, bn = seg.cfg.bm, seg.cfg.bn

    @pl.when(r1 > r0)
    def _():
        rows_ok = (r0 + jnp.arange(bm)) < r1
        c0 = j * bn
        el = jnp.minimum(ex, seg.e - 1)  # pseudo-expert E (zero rows) loads expert E-1, then zeroes
        offs = (0, seg.n) if seg.gated else (0,)
        kw = dict(el=el, r0=r0, rows_ok=rows_ok, c0=c0, offs=offs, s=s, scheme=seg.scheme,
                  cfg=seg.cfg, k=seg.k, n=seg.n, steps=seg.steps, step_k=seg.step_k,
                  k_exact=seg.k_exact, n_exact=seg.n_exact, interpret=interpret)
        if seg.scheme.weight_only:
            accs = _wonly_acc(seg.ref(refs, "x"), seg.ref(refs, "w"), seg.ref(refs, "scale"),
                              seg.ref(refs, "offset"), w_kmajor=seg.w_kmajor, **kw)
        else:
            accs = _wa_acc(seg.ref(refs, "x"), seg.ref(refs, "xs"), seg.ref(refs, "w"),
                           seg.ref(refs, "scale"), **kw)
        acc = jax.nn.silu(accs[0]) * accs[1] if seg.gated else accs[0]
        acc = jnp.where(ex < seg.e, acc, 0.0)
        cols_ok = (c0 + jnp.arange(bn)) < seg.n
        _store(seg.ref(refs, "o"), acc, s, r0, rows_ok, c0, bn, cols_ok, splits)


def _gmm_kernel(*refs, seg: Segment, interpret: bool):
    """The one-segment launch: program id -> (tile, column block, split) -> ``run_tile``."""
    ex_ref, r0_ref, r1_ref = (seg.ref(refs, name) for name in ("ex", "r0", "r1"))
    t, j, s = _decode_pid(pl.program_id(0), seg.n_blocks, seg.cfg.split_k, ex_ref.shape[0],
                          seg.cfg.group_m)
    run_tile(seg, refs, ex=ex_ref[t], r0=r0_ref[t], r1=r1_ref[t], j=j, s=s,
             splits=seg.cfg.split_k, interpret=interpret)


def _dequant_kernel(
    # inputs
    w_ref, scale_ref, offset_ref,
    # outputs
    o_ref,
    *, scheme: QScheme, k: int, n: int, bn: int,
):
    """One 128-row chunk x ``bn`` columns of one expert: codes -> ``(u - bias) * s + z`` in bf16."""
    ex, c, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bits = packing.storage_bits(scheme)
    v = 8 // bits
    sub = packing.CHUNK // v
    n0 = j * bn
    cols_ok = (n0 + jnp.arange(bn)) < n
    kcols = c * sub + jnp.arange(sub)
    p = plgpu.load(w_ref.at[ex, pl.ds(n0, bn), pl.ds(c * sub, sub)],
                   mask=cols_ok[:, None] & (kcols < w_ref.shape[2])[None, :], other=0)
    p = p.T  # [sub, bn]
    g = jnp.int32(0) if scheme.group_size == -1 else (c * packing.CHUNK) // scheme.group_size
    g = jnp.minimum(g, scale_ref.shape[1] - 1)
    sc = plgpu.load(scale_ref.at[ex, g, pl.ds(n0, bn)], mask=cols_ok, other=0.0)
    sc = sc.astype(jnp.float32)
    z = -packing.code_bias(scheme) * sc
    if offset_ref is not None:
        z = z + plgpu.load(offset_ref.at[ex, g, pl.ds(n0, bn)], mask=cols_ok,
                           other=0.0).astype(jnp.float32)
    for jj in range(v):
        u = p if v == 1 else (p >> (jj * bits)) & ((1 << bits) - 1)
        wv = u.astype(jnp.float32) * sc[None, :] + z[None, :]
        ks = c * packing.CHUNK + jj * sub + jnp.arange(sub)
        plgpu.store(o_ref.at[ex, pl.ds(c * packing.CHUNK + jj * sub, sub), pl.ds(n0, bn)],
                    wv.astype(o_ref.dtype), mask=(ks < k)[:, None] & cols_ok[None, :])


def _drop_arg(kernel, index):
    """Kernel wrapper that takes one ref fewer and passes None in its place."""

    def wrapped(*refs):
        refs = list(refs)
        refs.insert(index, None)
        return kernel(*refs)

    return wrapped


@functools.partial(jax.jit, static_argnames=("scheme", "k", "n", "dtype", "interpret"))
def dequantize_weights(qweight, scale, offset, *, scheme: QScheme, k: int, n: int, dtype,
                       interpret: bool = False):
    """Weight-only packed codes ``[E, N, Kp/v]`` -> ``[E, K, N]`` in ``dtype`` (one Pallas pass).

    For large token counts ``gmm`` dequantizes once and runs the bf16 kernel: the fused kernel
    pays the unpack per m-tile and cannot pipeline register-produced operands (NOTES.md).
    """
    e = qweight.shape[0]
    bn = 128
    kernel = functools.partial(_dequant_kernel, scheme=scheme, k=k, n=n, bn=bn)
    args = (qweight, scale) if offset is None else (qweight, scale, offset)
    if offset is None:
        kernel = _drop_arg(kernel, 2)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((e, k, n), dtype),
        grid=(e, -(-packing.padded_k(scheme, k) // packing.CHUNK), -(-n // bn)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name=f"dequant_{scheme.name}",
    )(*args)


# ---------------------------------------------------------------------------------------------
# wrappers
# ---------------------------------------------------------------------------------------------
def _step_k(scheme: QScheme, cfg: TileConfig) -> int:
    """K per step: the 128-row chunk for sub-byte codes or K-grouped scales, else ``bk``."""
    if scheme.w_bits != 16 and (packing.storage_bits(scheme) < 8 or scheme.group_size != -1):
        return packing.CHUNK
    return cfg.bk


def supports(scheme: QScheme, k: int) -> bool:
    """Can ``gmm`` run ``scheme`` on ``k`` input features? (``ops.grouped_matmul`` keeps the
    reference where it cannot: K-groups that are not multiples of the 128-row chunk.)"""
    g = scheme.group_size
    return scheme.w_bits == 16 or g == -1 or (g % packing.CHUNK == 0 and k % g == 0)


def _check_scheme(scheme: QScheme):
    if scheme.group_size != -1 and scheme.group_size % packing.CHUNK:
        raise ValueError(
            f"group_size: kernels support -1 or multiples of {packing.CHUNK}, got "
            f"{scheme.group_size} ({scheme.name}); use impl='reference'")


def _exact(k: int, kp: int, n: int, step_k: int, total_steps: int, cfg: TileConfig) -> dict:
    """Static facts that let the kernels drop K and column masks (see ``_mask2``)."""
    return dict(k_exact=k == kp and k % step_k == 0 and total_steps % cfg.split_k == 0,
                n_exact=n % cfg.bn == 0)


def _launch(kernel, args, *, out_m, n, cfg, n_tiles, n_blocks, out_dtype, interpret, name):
    splits = cfg.split_k
    shape = (splits, out_m, n) if splits > 1 else (out_m, n)
    dtype = jnp.float32 if splits > 1 else out_dtype
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(shape, dtype),
        grid=(n_tiles * n_blocks * splits,),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    if splits > 1:
        out = jnp.sum(out, axis=0).astype(out_dtype)
    return out


def _flat_args(named):
    """``[(name, array | None)]`` -> (the arrays, the ``Segment.refs`` of their positions)."""
    arrays, refs = [], []
    for name, a in named:
        refs.append((name, None if a is None else len(arrays)))
        if a is not None:
            arrays.append(a)
    return arrays, refs


@functools.partial(jax.jit, static_argnames=("scheme", "cfg", "interpret", "out_dtype",
                                             "w_kmajor", "gated"))
def _gmm_wonly(x, w, scale, offset, group_sizes, *, scheme, cfg, interpret, out_dtype,
               w_kmajor=False, gated=False):
    m, k = x.shape
    e = group_sizes.shape[0]
    # bf16 [E, K, N] (or [E, N, K] when w_kmajor); codes [E, N, Kp/v]
    n = w.shape[1] if (scale is not None or w_kmajor) else w.shape[-1]
    tiles = tile_table(group_sizes, m, cfg.bm, interpret=interpret)
    arrays, refs = _flat_args([("ex", tiles[0]), ("r0", tiles[1]), ("r1", tiles[2]), ("x", x),
                               ("xs", None), ("w", w), ("scale", scale), ("offset", offset)])
    seg = make_segment(scheme, cfg, k=k, n=n, e=e, gated=gated, w_kmajor=w_kmajor,
                       refs=[*refs, ("o", len(arrays))])
    return _launch(functools.partial(_gmm_kernel, seg=seg, interpret=interpret), arrays,
                   out_m=m, n=seg.n, cfg=cfg, n_tiles=tiles[0].shape[0], n_blocks=seg.n_blocks,
                   out_dtype=out_dtype, interpret=interpret, name=f"gmm_{scheme.name}")


@functools.partial(jax.jit, static_argnames=("scheme", "cfg", "interpret", "out_dtype", "gated"))
def _gmm_wa(xq, xs, w, ws, group_sizes, *, scheme, cfg, interpret, out_dtype, gated=False):
    m, k = xq.shape
    e = group_sizes.shape[0]
    tiles = tile_table(group_sizes, m, cfg.bm, interpret=interpret)
    arrays, refs = _flat_args([("ex", tiles[0]), ("r0", tiles[1]), ("r1", tiles[2]),
                               ("x", xq), ("xs", xs), ("w", w), ("scale", ws), ("offset", None)])
    seg = make_segment(scheme, cfg, k=k, n=w.shape[1], e=e, gated=gated,
                       refs=[*refs, ("o", len(arrays))])
    return _launch(functools.partial(_gmm_kernel, seg=seg, interpret=interpret), arrays,
                   out_m=m, n=seg.n, cfg=cfg, n_tiles=tiles[0].shape[0], n_blocks=seg.n_blocks,
                   out_dtype=out_dtype, interpret=interpret, name=f"gmm_{scheme.name}")


def _validate(x, w, group_sizes, scheme, transpose_w=False):
    if x.ndim != 2:
        raise ValueError(f"x: expected [M, K], got shape {x.shape}")
    if x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x: dtype {x.dtype} must be bfloat16 or float16")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"group_sizes: expected int [E], got {group_sizes.dtype}{group_sizes.shape}")
    e = group_sizes.shape[0]
    if isinstance(w, PackedWeight):
        if w.scheme != scheme:
            raise ValueError(f"scheme: {scheme.name} given but weights are {w.scheme.name}")
        if w.qweight.ndim != 3 or w.lead_shape != (e,):
            raise ValueError(f"w: expected {e} experts of packed weights, got {w.lead_shape}")
        if w.k != x.shape[1]:
            raise ValueError(f"w: K={w.k} does not match x's K={x.shape[1]}")
    else:
        if scheme != W16A16:
            raise ValueError(f"w: scheme {scheme.name} needs PackedWeight (quant.packing.pack)")
        if transpose_w:
            if w.ndim != 3 or w.shape[0] != e or w.shape[2] != x.shape[1]:
                raise ValueError(f"w: transpose_w expects [E={e}, N, K={x.shape[1]}], got shape "
                                 f"{w.shape}")
        elif w.ndim != 3 or w.shape[0] != e or w.shape[1] != x.shape[1]:
            raise ValueError(f"w: expected [E={e}, K={x.shape[1]}, N], got shape {w.shape}")


EPILOGUES = ("none", "swiglu")


def gmm(x: jax.Array, w: PackedWeight | jax.Array, group_sizes: jax.Array, *,
        scheme: QScheme | str | None = None, tile: TileConfig | None = None,
        interpret: bool = False, dequant_first: bool | None = None,
        tile_bf16: TileConfig | None = None, out_dtype=None,
        transpose_w: bool = False, epilogue: str = "none") -> jax.Array:
    """Pallas grouped GEMM ``[M, K] x [E, K, N] -> [M, N]`` for any scheme (the kernel itself).

    ``w`` is a bf16/f16 array ``[E, K, N]`` (w16a16) or a ``PackedWeight``; ``scheme`` defaults to
    the weight's. Weight-activation schemes quantize ``x`` with ``act_quant.quantize_activations``
    first (a Pallas kernel). ``tile`` defaults to ``tuning.choose_tile``. Weight-only schemes with
    many tokens per expert (``tuning.dequant_first``, or ``dequant_first=True``) dequantize the
    weights to bf16 in one pass and run the bf16 kernel with ``tile_bf16``. ``out_dtype``
    (default ``x.dtype``; float32 keeps the f32 accumulator) is the dtype of the result.
    ``transpose_w=True`` (bf16/f16 only): ``w`` is ``[E, N, K]`` and the product uses each
    ``w[e].T``, read in place (the backward's ``dy @ w[e]^T`` without a transposed copy).
    ``epilogue="swiglu"``: ``w`` is a fused gate_up ``[E, K, 2I]`` (gate columns, then up) and the
    result is ``silu(x @ gate) * (x @ up)`` ``[M, I]``, computed in f32 in the tile's epilogue
    (each program accumulates a gate and an up block of the same columns; no split-K).
    """
    if scheme is None:
        scheme = w.scheme if isinstance(w, PackedWeight) else W16A16
    scheme = QScheme.parse(scheme)
    if transpose_w and isinstance(w, PackedWeight):
        raise ValueError("transpose_w: only for bf16/f16 weight arrays, not PackedWeight")
    _validate(x, w, group_sizes, scheme, transpose_w)
    _check_scheme(scheme)
    m, k = x.shape
    e = group_sizes.shape[0]
    n = w.n if isinstance(w, PackedWeight) else w.shape[1 if transpose_w else 2]
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if out_dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"out_dtype: {out_dtype} must be bfloat16, float16 or float32")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: {epilogue!r} is not one of {EPILOGUES}")
    gated = epilogue == "swiglu"
    if gated and (n % 2 or transpose_w):
        raise ValueError(f"epilogue: swiglu needs fused gate_up weights [E, K, 2I] (N={n}) and "
                         "no transpose_w")
    if tile is None:
        tile = tuning.choose_tile(scheme, m=m, e=e, n=n, k=k)
    if gated:
        tile = dataclasses.replace(tile, split_k=1)  # silu needs the whole K sum
    if m == 0:
        return jnp.zeros((0, n // 2 if gated else n), out_dtype)
    if scheme.weight_only:
        if isinstance(w, PackedWeight):
            if dequant_first is None:
                dequant_first = tuning.dequant_first(scheme, m=m, e=e)
            if dequant_first:
                wd = dequantize_weights(w.qweight, w.scale, w.offset, scheme=scheme, k=k, n=n,
                                        dtype=x.dtype, interpret=interpret)
                if tile_bf16 is None:
                    tile_bf16 = tuning.choose_tile(W16A16, m=m, e=e, n=n, k=k)
                if gated:
                    tile_bf16 = dataclasses.replace(tile_bf16, split_k=1)
                return _gmm_wonly(x, wd, None, None, group_sizes, scheme=W16A16,
                                  cfg=tile_bf16, interpret=interpret, out_dtype=out_dtype,
                                  gated=gated)
            return _gmm_wonly(x, w.qweight, w.scale, w.offset, group_sizes, scheme=scheme,
                              cfg=tile, interpret=interpret, out_dtype=out_dtype, gated=gated)
        return _gmm_wonly(x, w, None, None, group_sizes, scheme=scheme, cfg=tile,
                          interpret=interpret, out_dtype=out_dtype, w_kmajor=transpose_w,
                          gated=gated)
    xq, xs = act_quant.quantize_activations(x, scheme, interpret=interpret)
    wq = w.qweight
    if scheme.fp8 and k % _step_k(scheme, tile):
        # a K tail needs masked loads with a zero fill, which Triton cannot splat in fp8: load
        # the codes as int8 bits and bitcast in the kernel (slower: not a direct fp8 operand)
        xq = lax.bitcast_convert_type(xq, jnp.int8)
        wq = lax.bitcast_convert_type(wq, jnp.int8)
    return _gmm_wa(xq, xs, wq, w.scale, group_sizes, scheme=scheme, cfg=tile,
                   interpret=interpret, out_dtype=out_dtype, gated=gated)


def tile_flops(m: int, k: int, n: int) -> float:
    """Useful FLOPs of a grouped GEMM (2 M K N)."""
    return 2.0 * m * k * n

