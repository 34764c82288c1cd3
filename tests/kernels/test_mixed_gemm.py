"""The one-launch mixed-precision grouped GEMM vs the reference: random assignments, all schemes.

Interpret mode on the CPU (and compiled too on a GPU). Reference: ``ops._by_scheme_reference``
(every stack dequantized by the quantization core, each row's activations fake-quantized with its
expert's scheme, f32 ragged matmul); outputs start poisoned (NaN), so a row no program stores fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mxmoe_jax.kernels.pallas import TileConfig
from mxmoe_jax.kernels.pallas.mixed_gemm import (
    Job,
    LaunchConfig,
    mixed_grouped_matmul,
    mixed_launch,
)

from mxmoe_jax.ops import _by_scheme_reference, apply_epilogue, grouped_matmul_by_scheme
from mxmoe_jax.quant import packing
from mxmoe_jax.quant.rtn import quantize_rtn

TOL = 8e-3  # relative Frobenius error of a bf16 output (tests/kernels/test_gmm.py's table)

# every scheme a kernel runs (w16a16 = bf16 arrays)
ALL_SCHEMES = ["w16a16", "w8a16_g-1_asym", "w4a16_g128_asym", "w3a16_g128_asym",
               "w2a16_g128_asym", "w2a16_g-1_sym", "w8a8_g-1_sym", "w4a8_g-1_sym",
               "w4a4_g-1_sym", "w4a4_g128_sym", "w8a8_g-1_fp8"]

# (group sizes, M): empty experts, a one-token expert, rows past the sum; all rows in one expert;
# one token per expert
GROUPS = {
    "mixed": ([0, 1, 37, 0, 5, 9, 3], 60),
    "all_in_one": ([0, 0, 40, 0, 0, 0], 40),
    "one_token": ([1, 1, 1, 1, 1, 1], 6),
}
SMALL = TileConfig(bm=16, bn=32, bk=32, split_k=1, num_warps=4, num_stages=2)
WIDE = TileConfig(bm=32, bn=16, bk=64, split_k=1, num_warps=4, num_stages=2, swap_ab=True)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def random_layer(seed: int, groups: str, schemes, *, k: int = 256, n: int = 48):
    """x, the stacks of a random assignment of experts to ``schemes``, parts, group sizes."""
    rng = np.random.default_rng(seed)
    gs, m = GROUPS[groups]
    e = len(gs)
    n_schemes = len(schemes)
    assignment = np.concatenate([np.arange(n_schemes), rng.integers(0, n_schemes, e - n_schemes)])
    rng.shuffle(assignment)
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (e, k, n), jnp.float32)
    stacks, parts = [], []
    for i, s in enumerate(schemes):
        experts = [ex for ex in range(e) if assignment[ex] == i]
        wi = w[np.asarray(experts)]
        wi = wi.astype(jnp.bfloat16) if s == "w16a16" else packing.pack(quantize_rtn(wi, s))
        stacks.append(wi)
        parts.append((wi, experts))
    return x, stacks, parts, jnp.asarray(gs, jnp.int32), tuple(int(a) for a in assignment)


CASES = [  # (seed, groups, the mix's schemes, epilogue, tiles, launch): all schemes covered
    (0, "mixed", ["w4a16_g128_asym", "w4a4_g128_sym", "w8a8_g-1_sym", "w2a16_g-1_sym"], "none",
     SMALL, None),
    (1, "mixed", ["w3a16_g128_asym", "w2a16_g128_asym", "w4a4_g-1_sym"], "swiglu", SMALL, None),
    (2, "all_in_one", ["w16a16", "w4a8_g-1_sym"], "none", WIDE,
     LaunchConfig(num_warps=4, num_stages=2, split_k=3)),
    (3, "one_token", ["w8a16_g-1_asym", "w2a16_g-1_sym", "w16a16", "w4a16_g128_asym",
                      "w8a8_g-1_fp8"], "none", SMALL,
     LaunchConfig(num_warps=4, num_stages=2, split_k=2)),
    (4, "one_token", ["w8a8_g-1_sym", "w8a8_g-1_fp8", "w4a4_g128_sym"], "swiglu", WIDE, None),
]


def test_cases_cover_every_scheme():
    assert {s for case in CASES for s in case[2]} == set(ALL_SCHEMES)


@pytest.mark.parametrize("seed,groups,schemes,epilogue,tile,launch", CASES,
                         ids=[f"{c[1]}-{len(c[2])}schemes-{c[3]}-seed{c[0]}" for c in CASES])
def test_mixed_equals_reference(seed, groups, schemes, epilogue, tile, launch, interpret):
    x, stacks, parts, gs, assignment = random_layer(seed, groups, schemes)
    out = mixed_grouped_matmul(x, stacks, gs, assignment, interpret=interpret, epilogue=epilogue,
                               tiles={i: tile for i in range(len(schemes))}, launch=launch,
                               poison=True)
    ref = _by_scheme_reference(x, parts, gs, jnp.float32, epilogue)
    assert out.shape == ref.shape and out.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(out, np.float32)).all()  # every row stored
    assert _rel(out, ref) < TOL
    rest = int(np.sum(np.asarray(gs)))
    np.testing.assert_array_equal(np.asarray(out[rest:], np.float32), 0.0)


def test_dequant_first_and_two_jobs_in_one_launch(interpret):
    """Weight-only stacks dequantized first; a second job (a shared expert: own x, own rows, own
    output) in the same launch."""
    x, stacks, parts, gs, assignment = random_layer(5, "mixed",
        ["w4a4_g-1_sym", "w8a8_g-1_sym", "w4a16_g128_asym"])
    xs = jax.random.normal(jax.random.key(9), (7, 256), jnp.float32).astype(jnp.bfloat16)
    ws = packing.pack(quantize_rtn(jax.random.normal(jax.random.key(8), (1, 256, 48)),
                                   "w4a16_g128_sym"))
    jobs = [Job(x=x, weights_by_scheme=tuple(stacks), group_sizes=gs, assignment=assignment),
            Job(x=xs, weights_by_scheme=(ws,), group_sizes=jnp.asarray([7], jnp.int32),
                assignment=(0,))]
    tiles = {(j, i): SMALL for j in range(2) for i in range(3)}
    out, out_shared = mixed_launch(jobs, tiles=tiles, interpret=interpret, dequant_first=True,
                                   epilogue="swiglu", poison=True)
    assert _rel(out, _by_scheme_reference(x, parts, gs, jnp.float32, "swiglu")) < TOL
    ref_shared = _by_scheme_reference(xs, [(ws, [0])], jnp.asarray([7], jnp.int32), jnp.float32,
                                      "swiglu")
    assert out_shared.shape == (7, 24) and _rel(out_shared, ref_shared) < TOL


def test_ops_one_launch_equals_per_scheme_launches(interpret):
    """``grouped_matmul_by_scheme``: the one-launch path and the per-scheme comparison agree."""
    x, stacks, parts, gs, assignment = random_layer(6, "mixed",
        ["w2a16_g128_asym", "w8a8_g-1_fp8", "w16a16"])
    impl = "interpret" if interpret else "kernel"
    one = grouped_matmul_by_scheme(x, parts, gs, impl=impl, launch="one")
    per = grouped_matmul_by_scheme(x, parts, gs, impl=impl, launch="per_scheme")
    ref = grouped_matmul_by_scheme(x, parts, gs, impl="reference")
    assert _rel(one, ref) < TOL and _rel(per, ref) < TOL
    assert _rel(one, per) < TOL


def test_no_rows_gives_an_empty_result():
    x, stacks, parts, gs, assignment = random_layer(7, "mixed", ["w16a16", "w8a8_g-1_sym"])
    out = mixed_grouped_matmul(x[:0], stacks, jnp.zeros_like(gs), assignment, interpret=True)
    assert out.shape == (0, 48)


def test_apply_epilogue_is_silu_gate_times_up():
    y = jax.random.normal(jax.random.key(0), (5, 8))
    want = np.asarray(y[:, :4]) / (1 + np.exp(-np.asarray(y[:, :4]))) * np.asarray(y[:, 4:])
    np.testing.assert_allclose(np.asarray(apply_epilogue(y, "swiglu")), want, rtol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(assignment=(0, 0, 0, 0, 0, 0, 0)), "stacks .* experts but the assignment gives it"),
    (dict(assignment=(0, 1)), "assignment: 2 entries for 7 experts"),
    (dict(epilogue="gelu"), "epilogue"),
])
def test_bad_input_says_what_to_fix(bad, match):
    x, stacks, parts, gs, assignment = random_layer(8, "mixed", ["w16a16", "w8a8_g-1_sym"])
    kw = dict(assignment=assignment, epilogue="none") | bad
    with pytest.raises(ValueError, match=match):
        mixed_grouped_matmul(x, stacks, gs, kw["assignment"], interpret=True,
                             epilogue=kw["epilogue"])


@pytest.mark.parametrize("case", ["mixed", "empty_experts", "one_expert", "rows_past_sum",
                                  "runtime"])
def test_one_launch_tables_equal_make_tiles(case, interpret):
    """``mixed_table.mixed_tables`` (one launch) gives each segment the ``make_tiles`` table of its
    experts and the starts table of the launch order, for two jobs of different E and bm."""
    from mxmoe_jax.kernels.pallas import make_tiles
    from mxmoe_jax.kernels.pallas import mixed_table as mt

    rng = np.random.default_rng(3)
    gs_a = rng.integers(0, 40, 7)
    if case == "empty_experts":
        gs_a[[0, 3, 4]] = 0
    if case == "one_expert":
        gs_a[:] = 0
        gs_a[5] = 90
    m_a = int(gs_a.sum()) + (37 if case == "rows_past_sum" else 0)
    gs_b = np.asarray([m_a], np.int64)  # a shared expert: every row
    assign_a = (0, 1, 1, 0, 2, 1, 0)
    jobs = [(gs_a, m_a, assign_a), (gs_b, m_a, (0,))]
    segments = [(0, 0, 16), (0, 1, 32), (0, 2, 64), (1, 0, 16)]  # (job, stack, bm)
    specs, assigns = [], []
    for ji, si, bm in segments:
        gs, m, a = jobs[ji]
        specs.append(mt.TableSpec(g0=0 if ji == 0 else 7, e=len(gs), m=m, bm=bm,
                                  rest=si == 0, n_experts=sum(1 for x in a if x == si),
                                  per_tile=3 if ji == 0 else 2))
        assigns.append(a)
    order = (2, 0, 3, 1)
    ep = mt.lanes_for(specs)
    if case == "runtime":
        members = jnp.stack([mt.runtime_members(jnp.asarray(a, jnp.int32), si, ep)
                             for a, (_, si, _) in zip(assigns, segments, strict=True)])
    else:
        members = jnp.asarray(mt.static_members(assigns, [si for _, si, _ in segments], ep))
    gs_all = jnp.asarray(np.concatenate([gs_a, gs_b]), jnp.int32)
    starts, ex, r0, r1, specs = mt.mixed_tables(gs_all, members, specs, order,
                                                interpret=interpret)
    want_counts = []
    for (ji, si, bm), sp in zip(segments, specs, strict=True):
        gs, m, a = jobs[ji]
        experts = tuple(e for e, x in enumerate(a) if x == si)
        w_ex, w_r0, w_r1, n_valid = make_tiles(jnp.asarray(gs, jnp.int32), m, bm,
                                               experts=experts, rest=sp.rest, with_count=True)
        at = slice(sp.offset, sp.offset + sp.n_tiles)
        np.testing.assert_array_equal(np.asarray(ex[at]), np.asarray(w_ex), err_msg=f"{ji, si}")
        np.testing.assert_array_equal(np.asarray(r0[at]), np.asarray(w_r0), err_msg=f"{ji, si}")
        np.testing.assert_array_equal(np.asarray(r1[at]), np.asarray(w_r1), err_msg=f"{ji, si}")
        want_counts.append(int(n_valid) * sp.per_tile)
    want_starts = np.concatenate([[0], np.cumsum([want_counts[i] for i in order])])
    np.testing.assert_array_equal(np.asarray(starts[:len(order) + 1]), want_starts)


@pytest.mark.parametrize("epilogue", ["none", "swiglu"])
def test_lowers_for_cuda_as_one_kernel(triton_ir, epilogue):
    """The whole mix (bf16, weight-only, int8, int4 and fp8 segments) lowers to ONE Triton
    kernel for sm_90 (every primitive of every branch, the SwiGLU epilogue's too, has a Triton
    lowering), with split-K where the epilogue allows it."""
    x, stacks, parts, gs, assignment = random_layer(
        9, "mixed", ["w16a16", "w4a16_g128_asym", "w8a8_g-1_sym", "w4a4_g-1_sym", "w8a8_g-1_fp8"])
    launch = LaunchConfig(num_warps=4, num_stages=2, split_k=2)
    irs = triton_ir(lambda v, g: mixed_grouped_matmul(v, stacks, g, assignment, epilogue=epilogue,
                                                      tiles={i: SMALL for i in range(5)},
                                                      launch=launch), x, gs)
    mixed = [ir for ir in irs if "mixed_gmm" in ir and "mixed_gmm_tables" not in ir]
    assert len(mixed) == 1, [ir[:80] for ir in irs]
    assert sum("mixed_gmm_tables" in ir for ir in irs) == 1  # every segment's table: one launch
    assert mixed[0].count("tt.dot") >= 5  # a dot per scheme branch (two per branch for swiglu)


def test_runtime_assignment_reassigns_experts_without_a_recompile(interpret):
    """An int32 ``assignment`` is data: two assignments with the same stack sizes run through
    one compiled call, each equal to the reference of its own assignment."""
    schemes = ["w4a16_g128_asym", "w8a8_g-1_sym"]
    x, _, _, gs, _ = random_layer(5, "mixed", schemes)
    e, k, n = gs.shape[0], x.shape[1], 48
    w = jax.random.normal(jax.random.key(7), (e, k, n), jnp.float32)
    f = jax.jit(lambda x, stacks, gs, a: mixed_grouped_matmul(
        x, stacks, gs, a, interpret=interpret, tiles={0: SMALL, 1: SMALL}, poison=True))
    cases = []
    for order in ([0, 1, 0, 1, 0, 1, 1], [1, 1, 0, 0, 1, 1, 0]):
        a = np.asarray(order)
        parts = []
        for i, s in enumerate(schemes):
            experts = [int(ex) for ex in np.nonzero(a == i)[0]]
            parts.append((packing.pack(quantize_rtn(w[np.asarray(experts)], s)), experts))
        cases.append((a, parts, _by_scheme_reference(x, parts, gs, jnp.float32)))
    sizes = []
    # the first call of a process can register JAX config states (a new trace context), so the
    # first assignment runs twice and the cache is compared from then on
    for a, parts, ref in (cases[0], *cases):
        out = f(x, [p for p, _ in parts], gs, jnp.asarray(a, jnp.int32))
        assert _rel(out, ref) < TOL
        sizes.append(f._cache_size())
    assert sizes[2] == sizes[1]  # the second assignment: no new compile
    with pytest.raises(ValueError, match=r"weights_by_scheme\[0\]: stacks 3 experts but the "
                                         "assignment gives it 4"):
        mixed_grouped_matmul(x, [p for p, _ in parts], gs, jnp.asarray([0, 0, 0, 0, 1, 1, 1]),
                             interpret=True)
