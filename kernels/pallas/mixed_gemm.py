"""One-launch mixed-precision grouped GEMM: a layer's experts in several schemes, one pallas_call.

MxMoE's kernel. The experts of one MoE projection are assigned schemes (``assignment[e]`` = the
index of expert ``e``'s weight stack in ``weights_by_scheme``); a per-scheme launch runs the
schemes one after another, each leaving the GPU idle at its tail and paying its own launch. Here
every scheme is a *segment* of one launch: a program reads which segment it belongs to and runs
that scheme's branch (``grouped_gemm.run_tile``) with the segment's own static tile shape
(``bm``, ``bn``, ``bk``, ``swap_ab``, ``group_m``); ``num_warps``, ``num_stages`` and ``split_k``
are one per launch (Triton compiles one kernel), taken from the heaviest segment.

Program table. Each segment's tile table (``make_tiles`` over its experts' rows of the sorted
``[M]``, valid tiles first) and the starts table below are built under ``jit`` from
``group_sizes`` by ONE small launch (``mixed_table.mixed_tables``). Segments are ordered by
their static cost per program, heaviest first, and a table of ``S + 1`` program starts (a cumulative
sum of valid tiles x column blocks x splits) maps program ``p`` to its segment by ``S`` scalar
compares: the programs in flight at the start are the heaviest tiles of the heaviest scheme (the
paper's greedy order), and the programs past the last valid one (the static grid is a bound) exit
at once. Rows past ``sum(group_sizes)`` are tiles of the first segment's pseudo-expert and store
zeros.

Several jobs. ``mixed_launch`` runs several independent grouped GEMMs (each with its own ``x``,
weights, groups and output, e.g. the routed experts and a shared expert) as the segments of one
launch; ``mixed_grouped_matmul`` is the one-job case.

Activations. Weight-activation segments read activation codes quantized by ``act_quant`` before
the launch, once per activation format (w8a8 and w4a8 share their per-token int8 codes), every
format of one group layout in one launch (``quantize_activations_multi``); weight-only
segments read ``x`` as it is. Weight-only segments with many rows per expert
(``tuning.dequant_first``) dequantize their codes first and run as bf16 segments.

Epilogue. ``epilogue="swiglu"``: the weights are fused gate_up stacks ``[n, K, 2I]`` and every
program accumulates a gate and an up block of the same columns, storing ``silu(gate) * up``
``[M, I]`` (f32 math, no split-K).

Reference: ``mxmoe_jax.ops.grouped_matmul_by_scheme``'s (every stack dequantized into one f32
``[E, K, N]``, each row's activations fake-quantized with its expert's scheme).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from mxmoe_jax.quant import packing
from mxmoe_jax.quant.packing import PackedWeight
from mxmoe_jax.quant.scheme import W16A16, QScheme

from . import act_quant, mixed_table, tuning
from .grouped_gemm import (
    EPILOGUES,
    Segment,
    _decode_pid,
    _step_k,
    dequantize_weights,
    make_segment,
    plgpu,
    run_tile,
    supports,
)
from .tile_config import TileConfig


@dataclass(frozen=True)
class Job:
    """One grouped GEMM of a mixed launch: ``x [M, K]`` rows sorted by expert, the weight stacks
    (an array ``[n_i, K, N]`` or a ``PackedWeight``) and the expert -> stack assignment (a static
    tuple, or an int32 array: see ``mixed_grouped_matmul``)."""

    x: jax.Array
    weights_by_scheme: tuple
    group_sizes: jax.Array
    assignment: tuple[int, ...]


def _scheme(w) -> QScheme:
    return w.scheme if isinstance(w, PackedWeight) else W16A16


def _lead(w) -> int:
    return w.lead_shape[0] if isinstance(w, PackedWeight) else w.shape[0]


def _kn(w) -> tuple[int, int]:
    return (w.k, w.n) if isinstance(w, PackedWeight) else (w.shape[1], w.shape[2])


def validate(job: Job, epilogue: str) -> tuple[int, int]:
    """Check one job's shapes and assignment; ``(K, N)`` of its weights."""
    x, ws, gs, assignment = job.x, job.weights_by_scheme, job.group_sizes, job.assignment
    if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"x: expected bf16/f16 [M, K], got {x.dtype}{tuple(x.shape)}")
    if gs.ndim != 1 or not jnp.issubdtype(gs.dtype, jnp.integer):
        raise ValueError(f"group_sizes: expected int [E], got {gs.dtype}{tuple(gs.shape)}")
    e = gs.shape[0]
    if len(assignment) != e:
        raise ValueError(f"assignment: {len(assignment)} entries for {e} experts")
    if not ws:
        raise ValueError("weights_by_scheme: no weight stacks")
    if isinstance(assignment, jax.Array):
        if assignment.ndim != 1 or not jnp.issubdtype(assignment.dtype, jnp.integer):
            raise ValueError(f"assignment: a runtime assignment must be int [E], got "
                             f"{assignment.dtype}{tuple(assignment.shape)}")
        if isinstance(assignment, jax.core.Tracer):  # traced: checked where it is concrete
            assignment = None
        else:
            assignment = tuple(int(a) for a in assignment)
    for i, w in enumerate(ws):
        if assignment is None:
            continue
        n_i = sum(1 for a in assignment if a == i)
        if _lead(w) != n_i:
            raise ValueError(f"weights_by_scheme[{i}]: stacks {_lead(w)} experts but the "
                             f"assignment gives it {n_i}")
        if n_i == 0:
            raise ValueError(f"weights_by_scheme[{i}]: no expert is assigned to it")
        if not isinstance(w, PackedWeight) and w.ndim != 3:
            raise ValueError(f"weights_by_scheme[{i}]: expected [n, K, N], got {w.shape}")
    if assignment is not None and any(not 0 <= a < len(ws) for a in assignment):
        raise ValueError(f"assignment: entries must index weights_by_scheme (0..{len(ws) - 1})")
    kns = {_kn(w) for w in ws}
    if len(kns) != 1:
        raise ValueError(f"weights_by_scheme: every stack must be [K, N] alike, got {sorted(kns)}")
    k, n = kns.pop()
    if x.shape[1] != k:
        raise ValueError(f"x: K={x.shape[1]} does not match the weights' K={k}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue: {epilogue!r} is not one of {EPILOGUES}")
    if epilogue == "swiglu" and n % 2:
        raise ValueError(f"epilogue: swiglu needs fused gate_up weights [n, K, 2I], got N={n}")
    for w in ws:
        if not supports(_scheme(w), k):
            raise ValueError(f"weights_by_scheme: {_scheme(w).name} has K-groups the kernels do "
                             f"not run on K={k}; use the reference")
    return k, n


def _members(jobs, segments, ep: int) -> jax.Array:
    """``members [S, EP]`` of ``mixed_table`` for segments ``(job, stack)``: a constant for
    static assignments, rows computed under jit for runtime ones."""
    if not any(isinstance(jobs[ji].assignment, jax.Array) for ji, _ in segments):
        return jnp.asarray(mixed_table.static_members(
            [jobs[ji].assignment for ji, _ in segments], [si for _, si in segments], ep))
    rows = []
    for ji, si in segments:
        a = jobs[ji].assignment
        rows.append(mixed_table.runtime_members(a, si, ep) if isinstance(a, jax.Array) else
                    jnp.asarray(mixed_table.static_members([a], [si], ep)[0]))
    return jnp.stack(rows)


def program_cost(seg: Segment) -> float:
    """Static bytes one program of ``seg`` loads (weights and activations over its K steps): the
    key of the heaviest-first order."""
    s = seg.scheme
    w_bytes = (2.0 if s.w_bits == 16 else packing.storage_bits(s) / 8) * (2 if seg.gated else 1)
    a_bytes = 2.0 if s.weight_only else 1.0
    k = seg.steps * seg.step_k
    return k * (seg.cfg.bn * w_bytes + seg.cfg.bm * a_bytes)


def _mixed_kernel(*refs, segs: tuple[Segment, ...], offsets: tuple[int, ...], splits: int,
                  interpret: bool):
    """Program -> segment (by the starts table, ref 0) -> (tile, column block, split) -> tile.
    Every segment's tile table lies in refs 1-3 from its ``offsets`` entry on."""
    starts = refs[0]
    pid = pl.program_id(0)
    sid = sum((pid >= starts[i + 1]).astype(jnp.int32) for i in range(len(segs)))
    for i, (seg, off) in enumerate(zip(segs, offsets, strict=True)):
        @pl.when(sid == i)
        def _(i=i, seg=seg, off=off):
            first = starts[i]
            per_tile = seg.n_blocks * splits
            n_valid = (starts[i + 1] - first) // per_tile
            t, j, s = _decode_pid(pid - first, seg.n_blocks, splits, n_valid, seg.cfg.group_m)
            tables = (seg.ref(refs, name) for name in ("ex", "r0", "r1"))
            ex_ref, r0_ref, r1_ref = tables
            run_tile(seg, refs, ex=ex_ref[off + t], r0=r0_ref[off + t], r1=r1_ref[off + t],
                     j=j, s=s, splits=splits, interpret=interpret)


@dataclass(frozen=True)
class LaunchConfig:
    """The per-launch parameters of a mixed launch (one Triton kernel)."""

    num_warps: int
    num_stages: int
    split_k: int


def _act_key(s: QScheme):
    return (s.a_bits, s.group_size, s.fp8)


def _activation_codes(job: Job, *, interpret: bool) -> dict:
    """``{act key: (codes, scales)}`` of every activation format the job's weight-activation
    stacks read: one launch per group layout (w8a8 and w4a4 per token: one read of ``x``)."""
    formats: dict = {}
    for w in job.weights_by_scheme:
        s = _scheme(w)
        if isinstance(w, PackedWeight) and not s.weight_only:
            formats.setdefault(_act_key(s), s)
    by_layout: dict = {}
    for key, s in formats.items():
        by_layout.setdefault(s.group_size, []).append((key, s))
    out = {}
    for group in by_layout.values():
        codes = act_quant.quantize_activations_multi(job.x, [s for _, s in group],
                                                     interpret=interpret)
        out.update({key: c for (key, _), c in zip(group, codes, strict=True)})
    return out


def mixed_launch(jobs: list[Job], *, tiles: dict | None = None, launch: LaunchConfig | None = None,
                 interpret: bool = False, out_dtype=None, epilogue: str = "none",
                 dequant_first: bool | None = None, poison: bool = False) -> list[jax.Array]:
    """Several grouped GEMMs (``Job``), each over experts in several schemes, as ONE launch.

    ``tiles``: optional ``{(job, stack): TileConfig}`` (default ``tuning.choose_tile`` per stack);
    ``launch``: the launch's ``num_warps`` / ``num_stages`` / ``split_k`` (default: those of the
    heaviest segment; ``split_k`` is 1 under ``epilogue="swiglu"``). Returns each job's ``[M, N]``
    (``[M, N / 2]`` for swiglu) in ``out_dtype`` (default the first job's ``x`` dtype).
    ``poison`` (tests): the outputs start as NaN buffers aliased into the launch, so an element
    no program stores stays NaN (compiled outputs otherwise start as whatever memory held).
    """
    gated = epilogue == "swiglu"
    shapes = [validate(job, epilogue) for job in jobs]
    out_dtype = jnp.dtype(jobs[0].x.dtype if out_dtype is None else out_dtype)
    if out_dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"out_dtype: {out_dtype} must be bfloat16, float16 or float32")
    empty = [job.x.shape[0] == 0 for job in jobs]
    if any(empty):  # no rows: nothing to launch for that job
        live = [j for j, emp in zip(jobs, empty, strict=True) if not emp]
        live_tiles = None if tiles is None else {
            (sum(1 for e in empty[:ji] if not e), si): t for (ji, si), t in tiles.items()
            if not empty[ji]}
        got = iter(mixed_launch(live, tiles=live_tiles, launch=launch, interpret=interpret,
                                out_dtype=out_dtype, epilogue=epilogue,
                                dequant_first=dequant_first, poison=poison) if live else [])
        return [jnp.zeros((0, n // 2 if gated else n), out_dtype) if emp else next(got)
                for emp, (_, n) in zip(empty, shapes, strict=True)]
    arrays: list[jax.Array] = []
    slots: dict[int, int] = {}

    def slot(a) -> int | None:
        if a is None:
            return None
        if id(a) not in slots:
            slots[id(a)] = len(arrays)
            arrays.append(a)
        return slots[id(a)]

    arrays += [None] * 4  # refs 0-3: the program starts and every segment's tile table
    plans = []  # (job, stack, scheme, tile, experts in the stack, named arrays, K, N, M)
    for ji, (job, (k, n)) in enumerate(zip(jobs, shapes, strict=True)):
        m = job.x.shape[0]
        e = job.group_sizes.shape[0]
        acts = _activation_codes(job, interpret=interpret)
        for si, w in enumerate(job.weights_by_scheme):
            scheme = _scheme(w)
            experts = _lead(w)
            cfg = (tiles or {}).get((ji, si)) or tuning.choose_tile(scheme, m=m, e=e, n=n, k=k)
            named = {"x": job.x, "xs": None, "w": w, "scale": None, "offset": None}
            if isinstance(w, PackedWeight):
                named.update(w=w.qweight, scale=w.scale, offset=w.offset)
                df = dequant_first if dequant_first is not None else tuning.dequant_first(
                    scheme, m=m, e=e)
                if scheme.weight_only and df:
                    named.update(w=dequantize_weights(w.qweight, w.scale, w.offset, scheme=scheme,
                                                      k=k, n=n, dtype=job.x.dtype,
                                                      interpret=interpret),
                                 scale=None, offset=None)
                    scheme = W16A16
                    cfg = (tiles or {}).get((ji, si)) or tuning.choose_tile(W16A16, m=m, e=e, n=n,
                                                                           k=k)
                if not scheme.weight_only:
                    xq, xs = acts[_act_key(scheme)]
                    wq = w.qweight
                    if scheme.fp8 and k % _step_k(scheme, cfg):
                        # K tail: fp8 codes as int8 bits (as gmm does; see its comment)
                        xq = lax.bitcast_convert_type(xq, jnp.int8)
                        wq = lax.bitcast_convert_type(wq, jnp.int8)
                    named.update(x=xq, xs=xs, w=wq, offset=None)
            elif w.dtype != job.x.dtype:
                named["w"] = w.astype(job.x.dtype)
            plans.append((ji, si, scheme, cfg, experts, named, k, n, m))
    if launch is None:
        # the heaviest segment's launch parameters: most programs x bytes per program
        def weight(p):
            ji, si, scheme, cfg, experts, named, k, n, m = p
            seg = make_segment(scheme, cfg, k=k, n=n, e=experts, gated=gated)
            return program_cost(seg) * experts * seg.n_blocks

        heavy = max(plans, key=weight)[3]
        launch = LaunchConfig(num_warps=heavy.num_warps, num_stages=heavy.num_stages,
                              split_k=heavy.split_k)
    splits = 1 if gated else launch.split_k
    outs = []
    for job, (_, n) in zip(jobs, shapes, strict=True):
        n_out = n // 2 if gated else n
        m = job.x.shape[0]
        outs.append(jax.ShapeDtypeStruct((splits, m, n_out) if splits > 1 else (m, n_out),
                                         jnp.float32 if splits > 1 else out_dtype))
    g0 = np.cumsum([0] + [job.group_sizes.shape[0] for job in jobs])
    segs, specs, grid = [], [], 0
    first_of_job: set[int] = set()
    for ji, _, scheme, cfg, experts, named, k, n, m in plans:
        cfg = dataclasses.replace(cfg, split_k=splits, num_warps=launch.num_warps,
                                  num_stages=launch.num_stages)
        rest = ji not in first_of_job  # the job's first segment stores the rows past the sum
        first_of_job.add(ji)
        refs = [("ex", 1), ("r0", 2), ("r1", 3)]
        refs += [(name, slot(a)) for name, a in named.items()]
        refs.append(("o", -1 - ji))  # outputs follow the inputs; resolved below
        seg = make_segment(scheme, cfg, k=k, n=n, e=experts, gated=gated, refs=refs)
        segs.append(seg)
        specs.append(mixed_table.TableSpec(
            g0=int(g0[ji]), e=jobs[ji].group_sizes.shape[0], m=m, bm=cfg.bm, rest=rest,
            n_experts=experts, per_tile=seg.n_blocks * splits))
        grid += specs[-1].n_tiles * seg.n_blocks * splits
    order = sorted(range(len(segs)), key=lambda i: -program_cost(segs[i]))
    ep = mixed_table.lanes_for(specs)
    starts, ex, r0, r1, specs = mixed_table.mixed_tables(
        jobs[0].group_sizes if len(jobs) == 1 else
        jnp.concatenate([job.group_sizes.astype(jnp.int32) for job in jobs]),
        _members(jobs, [(ji, si) for ji, si, *_ in plans], ep), specs, order,
        interpret=interpret)
    arrays[:4] = [starts, ex, r0, r1]
    aliases = {}
    if poison:
        for ji, o in enumerate(outs):
            aliases[len(arrays)] = ji
            arrays.append(jnp.full(o.shape, jnp.nan, o.dtype))
    n_in = len(arrays)
    segs = [dataclasses.replace(segs[i], refs=tuple(
        (name, n_in + (-1 - r) if name == "o" else r) for name, r in segs[i].refs))
        for i in order]
    kernel = functools.partial(_mixed_kernel, segs=tuple(segs),
                               offsets=tuple(specs[i].offset for i in order), splits=splits,
                               interpret=interpret)
    names = "+".join(sorted({s.scheme.name for s in segs}))
    res = pl.pallas_call(
        kernel, out_shape=tuple(outs), grid=(grid,), input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=launch.num_warps,
                                             num_stages=launch.num_stages),
        interpret=interpret, name=f"mixed_gmm_{names}",
    )(*arrays)
    if splits > 1:
        res = [jnp.sum(r, axis=0).astype(out_dtype) for r in res]
    return list(res)


def mixed_grouped_matmul(x: jax.Array, weights_by_scheme, group_sizes: jax.Array,
                         assignment, *, tiles: dict | None = None,
                         launch: LaunchConfig | None = None, interpret: bool = False,
                         out_dtype=None, epilogue: str = "none",
                         dequant_first: bool | None = None, poison: bool = False) -> jax.Array:
    """``x [M, K]`` (rows sorted by expert) times experts in several schemes, in ONE launch.

    ``weights_by_scheme[i]``: the stacked weights (bf16/f16 array ``[n_i, K, N]`` or
    ``PackedWeight``) of the experts ``e`` with ``assignment[e] == i``, in ascending order;
    ``assignment``: ``E`` stack indices, a static tuple, or an int32 array (runtime data: which
    experts a stack holds can change without a recompile, only the stack sizes are static; a
    traced array is trusted to give stack ``i`` exactly ``n_i`` experts, a concrete one is
    checked); ``group_sizes [E]`` rows per expert (rows past the sum come out as zeros).
    ``tiles``: ``{stack: TileConfig}``. See ``mixed_launch`` for the rest.
    """
    tiles = None if tiles is None else {(0, i): t for i, t in tiles.items()}
    if not isinstance(assignment, jax.Array):
        assignment = tuple(int(a) for a in assignment)
    job = Job(x=x, weights_by_scheme=tuple(weights_by_scheme), group_sizes=group_sizes,
              assignment=assignment)
    return mixed_launch([job], tiles=tiles, launch=launch, interpret=interpret,
                        out_dtype=out_dtype, epilogue=epilogue, dequant_first=dequant_first,
                        poison=poison)[0]


__all__ = ["Job", "LaunchConfig", "TileConfig", "mixed_grouped_matmul", "mixed_launch"]
