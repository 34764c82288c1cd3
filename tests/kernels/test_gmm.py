"""Grouped GEMM kernels vs the pure-jnp reference, every scheme, awkward group sizes and shapes.

Runs the real kernel bodies in Pallas interpret mode on the CPU (and compiled too on a GPU).
Reference: ``grouped_matmul_reference`` (weights dequantized by the quantization core, f32
``lax.ragged_dot``). Tolerances (relative Frobenius error) by output dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mxmoe_jax.kernels.pallas import TileConfig, gmm, make_tiles
from mxmoe_jax.kernels.pallas import grouped_gemm as gmm_mod

from mxmoe_jax.ops import grouped_matmul, grouped_matmul_reference
from mxmoe_jax.quant import act, packing
from mxmoe_jax.quant.rtn import quantize_rtn
from mxmoe_jax.quant.scheme import QScheme

# relative error vs the f32 reference (the output is rounded to bf16/f16 once)
TOL = {jnp.bfloat16: 8e-3, jnp.float16: 1e-3}

# (group_sizes, M): empty experts, a one-token expert, partial tiles, trailing rows past the sum
GROUPS = {
    "mixed": ([0, 1, 37, 0, 5], 48),
    "one_expert": ([0, 0, 23, 0], 23),
    "all_empty_but_last": ([0, 0, 0, 2], 2),
}
SMALL = TileConfig(bm=16, bn=32, bk=32, split_k=1, num_warps=4, num_stages=2)
SPLIT = TileConfig(bm=32, bn=64, bk=64, split_k=3, num_warps=4, num_stages=2)


def _data(groups, k, n, dtype=jnp.bfloat16, seed=0):
    gs, m = GROUPS[groups]
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (len(gs), k, n), jnp.float32)
    return x, w, jnp.asarray(gs, jnp.int32)


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_make_tiles_cover_every_row_once():
    gs = jnp.asarray([0, 1, 37, 0, 5], jnp.int32)
    m, bm = 50, 16
    ex, r0, r1 = (np.asarray(a) for a in make_tiles(gs, m, bm))
    assert len(ex) == m // bm + len(gs) + 1
    cover = np.zeros(m, int)
    ends = np.cumsum(np.asarray(gs))
    for e, a, b in zip(ex, r0, r1, strict=False):
        assert 0 <= b - a <= bm
        cover[a:b] += 1
        if b > a and e < len(gs):
            assert ends[e] - gs[e] <= a and b <= ends[e]  # a tile never crosses experts
        if b > a and e == len(gs):
            assert a >= ends[-1]  # the pseudo-expert covers only rows past the sum
    np.testing.assert_array_equal(cover, 1)
    sizes = r1 - r0
    # heaviest first: full tiles, then partial ones, then padding
    assert np.all(sizes[: np.sum(sizes == bm)] == bm)
    assert np.all(sizes[np.sum(sizes > 0):] == 0)


@pytest.mark.parametrize("groups,tile", [("mixed", SMALL), ("one_expert", SPLIT),
                                         ("all_empty_but_last", SMALL)],
                         ids=["mixed-small", "one_expert-split3", "last_only-small"])
def test_bf16(groups, tile, interpret):
    x, w, gs = _data(groups, 200, 40)
    wb = w.astype(jnp.bfloat16)
    out = gmm(x, wb, gs, tile=tile, interpret=interpret)
    ref = grouped_matmul_reference(x, wb, gs)
    assert out.shape == ref.shape and out.dtype == jnp.bfloat16
    assert _rel(out, ref) < TOL[jnp.bfloat16]


def test_f16_k1408(interpret):
    x, w, gs = _data("mixed", 1408, 40, dtype=jnp.float16)
    wh = w.astype(jnp.float16)
    out = gmm(x, wh, gs, tile=SPLIT, interpret=interpret)
    assert out.dtype == jnp.float16
    assert _rel(out, grouped_matmul_reference(x, wh, gs)) < TOL[jnp.float16]


# (scheme, K, tile): each scheme once, the two tiles alternating; K = 200 and 1408 are not
# multiples of the 128-row chunk / of bk
WONLY = [("w8a16_g-1_asym", 200, SPLIT), ("w8a16_g128_sym", 384, SMALL),
         ("w4a16_g128_asym", 384, SPLIT), ("w4a16_g-1_sym", 200, SMALL),
         ("w3a16_g128_asym", 384, SMALL), ("w2a16_g128_asym", 384, SPLIT),
         ("w2a16_g-1_sym", 200, SPLIT), ("w4a16_g128_sym", 1408, SPLIT)]


@pytest.mark.parametrize("name,k,tile", WONLY)
def test_weight_only(name, k, tile, interpret):
    x, w, gs = _data("mixed", k, 40, seed=k)
    p = packing.pack(quantize_rtn(w, name))
    out = gmm(x, p, gs, tile=tile, interpret=interpret)
    assert _rel(out, grouped_matmul_reference(x, p, gs)) < TOL[jnp.bfloat16]


WA = [("w8a8_g-1_sym", 200, "mixed", SPLIT), ("w4a8_g-1_sym", 200, "one_expert", SMALL),
      ("w4a4_g-1_sym", 200, "mixed", SMALL), ("w4a4_g128_sym", 384, "one_expert", SPLIT),
      ("w4a4_g128_sym", 384, "mixed", SMALL), ("w8a8_g-1_fp8", 200, "mixed", SPLIT)]


@pytest.mark.parametrize("name,k,groups,tile", WA)
def test_weight_activation_gemm(name, k, groups, tile, interpret):
    """The GEMM part alone, fed the reference's activation codes: equal to f32 math."""
    s = QScheme.parse(name)
    x, w, gs = _data(groups, k, 40, seed=k + 1)
    qw = quantize_rtn(w, s)
    p = packing.pack(qw)
    xq, xs = act.quantize_activations(x, s)
    wq = p.qweight
    if s.fp8:  # the kernel takes fp8 codes as their int8 bits
        xq = jax.lax.bitcast_convert_type(xq, jnp.int8)
        wq = jax.lax.bitcast_convert_type(wq, jnp.int8)
    ref = grouped_matmul_reference(x, p, gs)
    out = gmm_mod._gmm_wa(xq, xs, wq, p.scale, gs, scheme=s, cfg=tile,
                          interpret=interpret, out_dtype=jnp.bfloat16)
    assert _rel(out, ref) < TOL[jnp.bfloat16]


# swap_ab: the weight tile is the MMA's left operand (out^T = W^T x^T); same results
SWAP = TileConfig(bm=16, bn=64, bk=32, split_k=1, num_warps=4, num_stages=2, swap_ab=True)
SWAP_SPLIT = TileConfig(bm=32, bn=64, bk=64, split_k=3, num_warps=4, num_stages=2, swap_ab=True)


@pytest.mark.parametrize("name,k,tile", [("w16a16", 200, SWAP), ("w4a16_g128_asym", 384, SWAP),
                                         ("w2a16_g-1_sym", 200, SWAP_SPLIT),
                                         ("w8a16_g-1_asym", 200, SWAP)])
def test_weight_only_swap_ab(name, k, tile, interpret):
    x, w, gs = _data("mixed", k, 72, seed=k + 3)  # N = 72: a partial 64-column block
    p = w.astype(jnp.bfloat16) if name == "w16a16" else packing.pack(quantize_rtn(w, name))
    out = gmm(x, p, gs, tile=tile, interpret=interpret)
    assert _rel(out, grouped_matmul_reference(x, p, gs)) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("name,k,tile", [("w8a8_g-1_sym", 200, SWAP_SPLIT),
                                         ("w4a4_g-1_sym", 200, SWAP),
                                         ("w4a4_g128_sym", 384, SWAP_SPLIT),
                                         ("w8a8_g-1_fp8", 256, SWAP)])
def test_weight_activation_swap_ab(name, k, tile, interpret):
    s = QScheme.parse(name)
    x, w, gs = _data("mixed", k, 72, seed=k + 4)
    p = packing.pack(quantize_rtn(w, s))
    xq, xs = act.quantize_activations(x, s)
    wq = p.qweight
    if s.fp8:
        xq = jax.lax.bitcast_convert_type(xq, jnp.int8)
        wq = jax.lax.bitcast_convert_type(wq, jnp.int8)
    out = gmm_mod._gmm_wa(xq, xs, wq, p.scale, gs, scheme=s, cfg=tile,
                          interpret=interpret, out_dtype=jnp.bfloat16)
    assert _rel(out, grouped_matmul_reference(x, p, gs)) < TOL[jnp.bfloat16]


def test_float32_output(interpret):
    """``out_dtype=float32`` returns the f32 accumulator (tighter than a bf16 output)."""
    x, w, gs = _data("mixed", 200, 40, seed=11)
    wb = w.astype(jnp.bfloat16)
    out = gmm(x, wb, gs, tile=SMALL, interpret=interpret, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    assert _rel(out, grouped_matmul_reference(x, wb, gs).astype(jnp.float32)) < TOL[jnp.bfloat16]
    ref32 = jax.lax.ragged_dot(x.astype(jnp.float32), wb.astype(jnp.float32), gs,
                               precision=jax.lax.Precision.HIGHEST)
    assert _rel(out, ref32) < 1e-5
    with pytest.raises(ValueError, match="out_dtype"):
        gmm(x, wb, gs, tile=SMALL, interpret=interpret, out_dtype=jnp.int32)


@pytest.mark.parametrize("name", ["w4a4_g128_sym", "w8a8_g-1_fp8"])
def test_weight_activation_end_to_end(name, interpret):
    """With the activation-quantization kernel in front: a rounding tie may flip one code."""
    k = 384
    x, w, gs = _data("mixed", k, 40, seed=5)
    p = packing.pack(quantize_rtn(w, name))
    out = gmm(x, p, gs, tile=SMALL, interpret=interpret)
    tol = 3e-2 if QScheme.parse(name).a_bits == 4 else 1e-2
    assert _rel(out, grouped_matmul_reference(x, p, gs)) < tol


def test_ops_picks_the_path_by_weight_type_and_errors():
    x, w, gs = _data("mixed", 128, 32)
    wb = w.astype(jnp.bfloat16)
    out = grouped_matmul(x, wb, gs, impl="reference")
    assert _rel(out, grouped_matmul_reference(x, wb, gs)) == 0
    with pytest.raises(ValueError, match="impl"):
        grouped_matmul(x, wb, gs, impl="fast")
    qw = quantize_rtn(w, "w4a16_g128_asym")
    # QuantizedWeight and its PackedWeight are the same operand (pack is exact)
    assert _rel(grouped_matmul_reference(x, qw, gs),
                grouped_matmul_reference(x, packing.pack(qw), gs)) == 0
    # interpret: a QuantizedWeight is packed and runs the scheme's kernel
    got = grouped_matmul(x, qw, gs, impl="interpret")
    assert _rel(got, gmm(x, packing.pack(qw), gs, interpret=True)) == 0
    # a K-group the kernels do not implement keeps the reference, even under interpret
    q64 = quantize_rtn(w, "w4a16_g64_asym")
    assert _rel(grouped_matmul(x, q64, gs, impl="interpret"),
                grouped_matmul_reference(x, q64, gs)) == 0
    with pytest.raises(ValueError, match="group_size"):
        gmm(x, packing.pack(quantize_rtn(w, "w4a16_g64_asym")), gs, interpret=True)
    with pytest.raises(ValueError, match="K="):
        gmm(x[:, :64], wb, gs, interpret=True)


def test_rows_past_the_sum_are_zero(interpret):
    x, w, gs = _data("mixed", 64, 32)
    out = gmm(x, w.astype(jnp.bfloat16), gs, tile=SMALL, interpret=interpret)
    assert np.all(np.asarray(out[43:], np.float32) == 0)


@pytest.mark.parametrize("groups", list(GROUPS))
def test_tile_table_kernel_matches_make_tiles(groups, interpret):
    from mxmoe_jax.kernels.pallas.grouped_gemm import tile_table

    gs, m = GROUPS[groups]
    gs = jnp.asarray(gs, jnp.int32)
    for bm in (16, 64):
        got = tile_table(gs, m + 3, bm, interpret=interpret)
        want = make_tiles(gs, m + 3, bm)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name,k", [("w4a16_g128_asym", 384), ("w2a16_g-1_sym", 200)])
def test_dequant_first_path(name, k, interpret):
    """Many-token path: one dequantization pass to bf16, then the bf16 kernel."""
    x, w, gs = _data("mixed", k, 40, seed=k + 2)
    p = packing.pack(quantize_rtn(w, name))
    out = gmm(x, p, gs, tile=SMALL, tile_bf16=SMALL, dequant_first=True, interpret=interpret)
    assert _rel(out, grouped_matmul_reference(x, p, gs)) < TOL[jnp.bfloat16]


# group_m: tiles taken 3 at a time with the tile index fastest (the last group is short)
GROUPED = TileConfig(bm=16, bn=32, bk=32, split_k=2, num_warps=4, num_stages=2, group_m=3)


@pytest.mark.parametrize("name", ["w16a16", "w4a16_g128_asym", "w8a8_g-1_sym"])
def test_group_m_order(name, interpret):
    x, w, gs = _data("mixed", 384, 72, seed=21)
    p = w.astype(jnp.bfloat16) if name == "w16a16" else packing.pack(quantize_rtn(w, name))
    out = gmm(x, p, gs, tile=GROUPED, interpret=interpret)
    tol = TOL[jnp.bfloat16] if QScheme.parse(name).weight_only else 2e-2
    assert _rel(out, grouped_matmul_reference(x, p, gs)) < tol


@pytest.mark.parametrize("tile", [SMALL, SPLIT, SWAP], ids=["small", "split3", "swap"])
def test_transpose_w_reads_w_kmajor(tile, interpret):
    """``transpose_w``: ``x @ w[e].T`` from ``w [E, N, K]`` in place (K = 200, N = 40 ragged)."""
    x, w, gs = _data("mixed", 200, 40, seed=31)
    w_nk = jnp.swapaxes(w, 1, 2).astype(jnp.bfloat16)  # [E, N, K]
    out = gmm(x, w_nk, gs, tile=tile, interpret=interpret, transpose_w=True)
    ref = grouped_matmul_reference(x, jnp.swapaxes(w_nk, 1, 2), gs)
    assert out.shape == ref.shape
    assert _rel(out, ref) < TOL[jnp.bfloat16]


def test_transpose_w_errors():
    x, w, gs = _data("mixed", 200, 40, seed=32)
    with pytest.raises(ValueError, match="transpose_w expects"):
        gmm(x, w.astype(jnp.bfloat16), gs, transpose_w=True, interpret=True)  # [E, K, N] given
    p = packing.pack(quantize_rtn(w, "w4a16_g-1_sym"))
    with pytest.raises(ValueError, match="PackedWeight"):
        gmm(x, p, gs, transpose_w=True, interpret=True)
