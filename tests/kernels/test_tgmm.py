"""The transposed grouped GEMM ``tgmm`` (dw of the grouped matmul) vs independent references.

Runs the kernel body in Pallas interpret mode on the CPU (and compiled too on a GPU). References:
a float64 NumPy loop over the experts (written here), and the VJP of XLA's ``lax.ragged_dot``
(what ``mxmoe_jax.ops`` used before the kernel). Tolerances (relative Frobenius error) by output
dtype: bf16 products are exact in f32, so an f32 result differs only in summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mxmoe_jax.kernels.pallas.tgmm import tgmm, tgmm_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}
# small blocks: several K and N blocks, several row steps per expert
SMALL = dict(bk=16, bn=32, bm=16, num_warps=4, num_stages=2)

# (group_sizes, M): empty experts, a one-row expert, partial steps, rows past sum(group_sizes)
GROUPS = {
    "mixed_padding": ([0, 1, 37, 0, 5], 48),
    "one_expert": ([0, 0, 23, 0], 23),
    "last_only_padding": ([0, 0, 0, 2], 7),
}


def _data(groups, k, n, dtype=jnp.bfloat16, seed=0):
    gs, m = GROUPS[groups]
    kx, kd = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(dtype)
    return x, dy, jnp.asarray(gs, jnp.int32)


def np_tgmm(x, dy, group_sizes):
    """dw[e] = x_e^T dy_e in float64; rows past the sum are ignored."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    gs = np.asarray(group_sizes)
    dw = np.zeros((len(gs), x.shape[1], dy.shape[1]))
    start = 0
    for e, g in enumerate(gs):
        dw[e] = x[start:start + g].T @ dy[start:start + g]
        start += g
    return dw


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# K = 40, N = 72: tails of the 16 / 32 blocks; K = 32, N = 64: no masks on the contiguous axes
@pytest.mark.parametrize("k,n", [(40, 72), (32, 64)], ids=["tails", "exact"])
@pytest.mark.parametrize("groups", list(GROUPS))
def test_f32_out_matches_loop(groups, k, n, interpret):
    x, dy, gs = _data(groups, k, n)
    dw = tgmm(x, dy, gs, interpret=interpret, **SMALL)
    assert dw.shape == (len(gs), k, n) and dw.dtype == jnp.float32
    want = np_tgmm(x, dy, gs)
    assert _rel(dw, want) < TOL[jnp.float32]
    empty = np.asarray(gs) == 0
    assert not np.any(np.asarray(dw)[empty])  # experts with no rows: exact zeros


def test_bf16_out_default_blocks_and_ragged_dot_vjp(interpret):
    """Default (H200) blocks, bf16 result; equal to dw of lax.ragged_dot's VJP."""
    x, dy, gs = _data("mixed_padding", 40, 72, seed=1)
    dw = tgmm(x, dy, gs, interpret=interpret, out_dtype=jnp.bfloat16)
    assert dw.dtype == jnp.bfloat16
    assert _rel(dw, np_tgmm(x, dy, gs)) < TOL[jnp.bfloat16]
    w0 = jnp.zeros((len(gs), 40, 72), jnp.float32)
    _, vjp = jax.vjp(lambda w: jax.lax.ragged_dot(x.astype(jnp.float32), w, gs,
                                                  precision=jax.lax.Precision.HIGHEST), w0)
    (want,) = vjp(dy.astype(jnp.float32))
    assert _rel(dw, want) < TOL[jnp.bfloat16]


def test_f16_inputs(interpret):
    x, dy, gs = _data("one_expert", 48, 40, dtype=jnp.float16, seed=2)
    dw = tgmm(x, dy, gs, interpret=interpret, out_dtype=jnp.float16, **SMALL)
    assert dw.dtype == jnp.float16 and _rel(dw, np_tgmm(x, dy, gs)) < TOL[jnp.float16]


def test_padding_rows_are_ignored(interpret):
    """Changing the rows past sum(group_sizes) changes nothing."""
    x, dy, gs = _data("mixed_padding", 40, 72, seed=3)
    tail = int(np.sum(gs))
    x2 = x.at[tail:].set(1e4)
    dy2 = dy.at[tail:].set(-1e4)
    a = tgmm(x, dy, gs, interpret=interpret, **SMALL)
    b = tgmm(x2, dy2, gs, interpret=interpret, **SMALL)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lowers_for_cuda_with_one_row_loop(triton_ir):
    """Lowered (not run) for sm_90 on the CPU: the Triton IR has the dynamic row loop as one
    ``scf.for`` (which Triton software-pipelines) around a transposed-lhs ``tt.dot``."""
    x = jax.ShapeDtypeStruct((300, 200), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((300, 136), jnp.bfloat16)
    gs = jax.ShapeDtypeStruct((6,), jnp.int32)
    ir = triton_ir(lambda a, b, g: tgmm(a, b, g, bk=128, bn=128, bm=64), x, dy, gs)[0]
    loops = [ln for ln in ir.splitlines() if "scf.for" in ln]
    assert len(loops) == 1 and "tensor<128x128xf32>" in loops[0], loops
    assert "tensor<64x128xbf16> -> tensor<128x64xbf16>" in ir  # x tile transposed for the MMA
    assert "scf.while" not in ir


def test_group_sizes_past_m_read_no_row_past_m(interpret):
    """sum(group_sizes) > M: each expert's rows are clipped to the M rows that exist."""
    x, dy, _ = _data("one_expert", 40, 40, seed=5)  # M = 23
    gs = jnp.asarray([10, 10, 10], jnp.int32)
    dw = tgmm(x, dy, gs, interpret=interpret, **SMALL)
    want = np_tgmm(x, dy, [10, 10, 3])
    assert _rel(dw, want) < TOL[jnp.float32]


def test_reference_matches_loop():
    x, dy, gs = _data("mixed_padding", 24, 16, seed=4)
    assert _rel(tgmm_reference(x, dy, gs), np_tgmm(x, dy, gs)) < 1e-6


def test_no_rows_gives_zeros():
    x = jnp.zeros((0, 16), jnp.bfloat16)
    dw = tgmm(x, jnp.zeros((0, 32), jnp.bfloat16), jnp.zeros((3,), jnp.int32))
    assert dw.shape == (3, 16, 32) and not np.any(np.asarray(dw))


def test_bad_input_errors():
    x, dy, gs = _data("one_expert", 16, 16)
    with pytest.raises(ValueError, match="x:"):
        tgmm(x[0], dy, gs)
    with pytest.raises(ValueError, match="x: dtype"):
        tgmm(x.astype(jnp.float32), dy, gs)
    with pytest.raises(ValueError, match="dy:"):
        tgmm(x, dy[:5], gs)
    with pytest.raises(ValueError, match="dy: dtype"):
        tgmm(x, dy.astype(jnp.float32), gs)
    with pytest.raises(ValueError, match="group_sizes"):
        tgmm(x, dy, gs.astype(jnp.float32))
    with pytest.raises(ValueError, match="group_sizes"):
        tgmm(x, dy, gs[None])
    for name, bad in (("bk", 24), ("bn", 8), ("bm", 0)):
        with pytest.raises(ValueError, match=name):
            tgmm(x, dy, gs, **{name: bad})
    with pytest.raises(ValueError, match="num_warps"):
        tgmm(x, dy, gs, num_warps=3)
    with pytest.raises(ValueError, match="num_stages"):
        tgmm(x, dy, gs, num_stages=0)
    with pytest.raises(ValueError, match="out_dtype"):
        tgmm(x, dy, gs, out_dtype=jnp.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n", [(3000, 640, 200), (64, 2048, 1408)])
def test_gpu_default_blocks_larger(m, k, n):
    """Compiled, default (H200) blocks: many pipelined row steps, an N tail, two empty experts."""
    e = 8
    counts = np.bincount(np.random.default_rng(m).integers(0, e - 2, m - m // 9), minlength=e)
    gs = jnp.asarray(counts, jnp.int32)  # ~1/9 of the rows are padding
    key = jax.random.key(m)
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.fold_in(key, 1), (m, n), jnp.float32).astype(jnp.bfloat16)
    dw = jax.jit(tgmm)(x, dy, gs)
    assert _rel(dw, np_tgmm(x, dy, gs)) < TOL[jnp.float32]
    assert not np.any(np.asarray(dw)[e - 2:])
