"""The program table of a mixed launch in ONE small Pallas launch.

A mixed launch (``mixed_gemm``) needs, for each segment (one weight stack of one job), the tile
table of ``make_tiles`` over the segment's experts (expert index into the stack, first row, end
row; valid tiles first, heaviest first) and a table of ``S + 1`` program starts (the cumulative
sum, in the launch's segment order, of valid tiles x programs per tile). Built from ``jnp`` ops
(``make_tiles`` per segment, a concatenate and a cumsum) that is ~240 small XLA ops for a
two-scheme layer, which XLA runs as several kernels of a few microseconds each: at 32 tokens the
table cost more than the GEMM's share of the schemes. Here it is one launch, as ``gmm``'s
``tile_table`` is for one segment.

Layout. ``mixed_tables(group_sizes, members, specs, order)`` returns ``(starts [S + 1], ex, r0,
r1)``: the three tile arrays hold every segment's table back to back, segment ``i``'s at
``specs[i].offset`` (``specs[i].n_tiles`` entries: ``num_tiles_bound``). Program ``(i, c)`` fills
entries ``c * BT ..`` of segment ``i``; program ``(0, 0)`` also writes the starts table.

Inputs: every job's ``group_sizes`` concatenated (job ``j``'s at ``specs[i].g0`` for its
segments), and ``members [S, EP]``: for segment ``i`` and expert lane ``l`` of its job, the
expert's index in the segment's stack, or -1 where the expert is another stack's.

Reference: ``make_tiles(group_sizes, m, bm, experts=, rest=, with_count=True)`` per segment
(``tests/kernels/test_mixed_gemm.py`` checks the two agree entry by entry).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from .grouped_gemm import num_tiles_bound, plgpu

BT = 32  # tile slots per program


@dataclass(frozen=True)
class TableSpec:
    """The static facts of one segment's tile table."""

    g0: int  # where its job's group sizes start in the concatenated input
    e: int  # experts of its job
    m: int  # rows of its job's x
    bm: int
    rest: bool  # its tiles include the rows past sum(group_sizes) (the job's first segment)
    n_experts: int  # experts in its stack (the pseudo-expert's index)
    per_tile: int  # programs per valid tile (column blocks x K splits)
    offset: int = 0  # where its table starts in the concatenated tile arrays

    @property
    def n_tiles(self) -> int:
        return num_tiles_bound(self.m, self.n_experts, self.bm)


def lanes_for(specs) -> int:
    """Expert lanes: a power of two >= every job's E + 1 (the pseudo-expert's lane), >= 16."""
    return max(16, 1 << max(sp.e for sp in specs).bit_length())


def static_members(assignments, stacks, ep: int) -> np.ndarray:
    """``members [S, EP]`` for static assignments: ``assignments[i]`` is segment ``i``'s job's
    expert -> stack tuple, ``stacks[i]`` the segment's stack."""
    out = np.full((len(stacks), ep), -1, np.int32)
    for i, (a, si) in enumerate(zip(assignments, stacks, strict=True)):
        mine = [ex for ex, s in enumerate(a) if s == si]
        out[i, mine] = np.arange(len(mine), dtype=np.int32)
    return out


def runtime_members(assignment: jax.Array, si: int, ep: int) -> jax.Array:
    """One segment's ``members`` row for a runtime int32 assignment."""
    mine = assignment == si
    local = jnp.cumsum(mine.astype(jnp.int32)) - 1
    row = jnp.where(mine, local, -1).astype(jnp.int32)
    return jnp.pad(row, (0, ep - row.shape[0]), constant_values=-1)


def _segment_sums(gs_ref, mem_ref, i: int, sp: TableSpec, ep: int, zero):
    """Per-lane facts of segment ``i``: what ``make_tiles`` builds from its experts' rows.
    ``zero``: a traced 0 (the masked block may read past the array: its start must be traced)."""
    lanes = jnp.arange(ep)
    gs = plgpu.load(gs_ref.at[pl.ds(zero + sp.g0, ep)], mask=lanes < sp.e, other=0)
    local = plgpu.load(mem_ref.at[zero + i, pl.ds(zero, ep)])
    ends = jnp.cumsum(gs, axis=0)
    starts = ends - gs
    total = jnp.sum(gs)
    rest_rows = jnp.maximum(sp.m - total, 0) if sp.rest else jnp.zeros((), jnp.int32)
    pseudo = lanes == sp.e  # the lane of the rows past the sum
    mine = (local >= 0) & (lanes < sp.e)
    gs = jnp.where(pseudo, rest_rows, jnp.where(mine, gs, 0))
    starts = jnp.where(pseudo, total, starts)
    ends = jnp.where(pseudo, total + rest_rows, ends)
    local = jnp.where(pseudo, sp.n_experts, local)
    full = gs // sp.bm
    part = (gs % sp.bm > 0).astype(jnp.int32)
    return dict(starts=starts, ends=ends, local=local, full=full, part=part,
                n_full=jnp.sum(full), n_part=jnp.sum(part))


def _tables_kernel(gs_ref, mem_ref, starts_ref, ex_ref, r0_ref, r1_ref, *,
                   specs: tuple[TableSpec, ...], order: tuple[int, ...], ep: int):
    seg, chunk = pl.program_id(0), pl.program_id(1)
    zero = seg * 0  # program ids are read here: interpret mode binds them at the top level only
    lanes = jnp.arange(ep)
    for i, sp in enumerate(specs):
        @pl.when((seg == i) & (chunk * BT < sp.n_tiles))
        def _(i=i, sp=sp):
            f = _segment_sums(gs_ref, mem_ref, i, sp, ep, zero)
            full, n_full = f["full"], f["n_full"]
            cf = jnp.cumsum(full, axis=0)
            cp = jnp.cumsum(f["part"], axis=0)
            j = chunk * BT + jnp.arange(BT)
            is_full = j < n_full
            jj = jnp.where(is_full, j, j - n_full)
            cum = jnp.where(is_full[:, None], cf[None, :], cp[None, :])  # [BT, EP]
            lane = jnp.minimum(jnp.sum((cum <= jj[:, None]).astype(jnp.int32), axis=1), sp.e)
            onehot = lanes[None, :] == lane[:, None]

            def pick(vec):
                return jnp.sum(jnp.where(onehot, vec[None, :], 0), axis=1)

            start_e, full_e = pick(f["starts"]), pick(full)
            local_tile = jj - (pick(cf) - full_e)
            row0 = jnp.where(is_full, start_e + local_tile * sp.bm, start_e + full_e * sp.bm)
            row1 = jnp.where(is_full, row0 + sp.bm, pick(f["ends"]))
            valid = j < n_full + f["n_part"]
            ok = j < sp.n_tiles
            at = pl.ds(sp.offset + chunk * BT, BT)
            plgpu.store(ex_ref.at[at], pick(f["local"]), mask=ok)
            plgpu.store(r0_ref.at[at], jnp.where(valid, row0, 0), mask=ok)
            plgpu.store(r1_ref.at[at], jnp.where(valid, row1, 0), mask=ok)

    @pl.when((seg == 0) & (chunk == 0))
    def _():
        sp_lanes = jnp.arange(starts_ref.shape[0])
        acc = jnp.zeros((), jnp.int32)
        out = jnp.zeros(starts_ref.shape, jnp.int32)
        for pos, i in enumerate(order):
            f = _segment_sums(gs_ref, mem_ref, i, specs[i], ep, zero)
            acc = acc + (f["n_full"] + f["n_part"]) * specs[i].per_tile
            out = jnp.where(sp_lanes == pos + 1, acc, out)
        plgpu.store(starts_ref.at[pl.ds(0, starts_ref.shape[0])], out)


def mixed_tables(group_sizes: jax.Array, members: jax.Array, specs, order, *,
                 interpret: bool = False):
    """``(starts [S + 1], ex, r0, r1)`` of a mixed launch; see the module docstring.

    ``specs``: one ``TableSpec`` per segment (their ``offset`` is set here), ``order``: the
    launch's segment order (heaviest first). Returns the specs with their offsets too.
    """
    offsets = np.cumsum([0] + [sp.n_tiles for sp in specs])
    specs = tuple(TableSpec(**{**sp.__dict__, "offset": int(o)})
                  for sp, o in zip(specs, offsets[:-1], strict=True))
    ep = members.shape[1]
    n_s = len(specs)
    sp2 = max(16, 1 << n_s.bit_length())  # the starts table padded to a power of two
    chunks = max(-(-sp.n_tiles // BT) for sp in specs)
    total = int(offsets[-1])
    kernel = functools.partial(_tables_kernel, specs=specs, order=tuple(order), ep=ep)
    tile = jax.ShapeDtypeStruct((total + BT,), jnp.int32)  # + BT: the last block's masked tail
    starts, ex, r0, r1 = pl.pallas_call(
        kernel, out_shape=(jax.ShapeDtypeStruct((sp2,), jnp.int32), tile, tile, tile),
        grid=(n_s, chunks),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret, name="mixed_gmm_tables",
    )(group_sizes.astype(jnp.int32), members.astype(jnp.int32))
    return starts, ex, r0, r1, specs


__all__ = ["TableSpec", "lanes_for", "mixed_tables", "runtime_members", "static_members"]
