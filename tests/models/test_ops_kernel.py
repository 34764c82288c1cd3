"""``ops.grouped_matmul`` through the Pallas kernel (forward and custom VJP) vs references.

On the CPU the kernel body runs in Pallas interpret mode (``impl="interpret"``); on a GPU the
``interpret`` fixture also runs it compiled (``impl="kernel"``), and the ``gpu`` tests compare a
whole model's logits on both paths. References: a float64 NumPy loop over the experts (written
here) and ``grouped_matmul_reference`` (``lax.ragged_dot``). The kernel path's backward (Pallas
``gmm`` on transposed weights for dx, ``tgmm`` for dw, ``dy`` rounded to bf16) matches the
reference's VJP to bf16 tolerance; with ``MXMOE_GROUPED_MATMUL_BWD=reference`` it is that VJP,
bit for bit.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxmoe_jax import ops
from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models import moe
from mxmoe_jax.ops import grouped_matmul, grouped_matmul_reference, kernel_backward, kernel_mode
from tests.conftest import ON_GPU

# (group_sizes, M): empty experts, a one-row expert, partial tiles, rows past sum(group_sizes)
GROUPS = {
    "empty_experts_padding": ([0, 9, 0, 1, 21, 0], 40),
    "one_expert": ([0, 0, 17, 0], 17),
    "last_only_padding": ([0, 0, 0, 3], 8),
}
# relative Frobenius error allowed vs the float64 loop, by output dtype (one rounding at the end)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}


def _impl(interpret: bool) -> str:
    return "interpret" if interpret else "kernel"


def _data(groups, k, n, dtype=jnp.bfloat16, seed=0):
    gs, m = GROUPS[groups]
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (len(gs), k, n), jnp.float32).astype(dtype)
    return x, w, jnp.asarray(gs, jnp.int32)


def np_grouped_matmul(x, w, group_sizes):
    """Rows of expert e times w[e] in float64; rows past the sum stay zero."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, g in enumerate(np.asarray(group_sizes)):
        out[start:start + g] = x[start:start + g] @ w[e]
        start += g
    return out


def np_grouped_grads(x, w, group_sizes, dy):
    """d/dx and d/dw of sum(grouped_matmul(x, w) * dy), in float64."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    start = 0
    for e, g in enumerate(np.asarray(group_sizes)):
        rows = slice(start, start + g)
        dx[rows] = dy[rows] @ w[e].T
        dw[e] = x[rows].T @ dy[rows]
        start += g
    return dx, dw


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _uses_pallas(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


# ------------------------------------------------------------------------------------ forward

@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16], ids=["f32out", "bf16out"])
@pytest.mark.parametrize("groups", list(GROUPS))
def test_forward_matches_loop_and_reference(groups, out_dtype, interpret):
    x, w, gs = _data(groups, 48, 24)
    y = jax.jit(lambda a, b, g: grouped_matmul(a, b, g, out_dtype=out_dtype,
                                               impl=_impl(interpret)))(x, w, gs)
    assert y.shape == (x.shape[0], 24) and y.dtype == out_dtype
    want = np_grouped_matmul(x, w, gs)
    assert _rel(y, want) < TOL[out_dtype]
    assert not np.any(np.asarray(y)[int(np.sum(gs)):])  # padding rows are exact zeros
    ref = grouped_matmul_reference(x, w, gs, out_dtype=out_dtype)
    assert _rel(y, ref) < TOL[out_dtype]


def test_forward_f16_and_f32_weights_cast_to_x(interpret):
    x, w, gs = _data("empty_experts_padding", 40, 16, dtype=jnp.float16)
    y = grouped_matmul(x, w, gs, impl=_impl(interpret))
    assert y.dtype == jnp.float16 and _rel(y, np_grouped_matmul(x, w, gs)) < TOL[jnp.float16]
    # f32 weights with bf16 x: cast to bf16 first, as the reference does
    xb, w32 = x.astype(jnp.bfloat16), w.astype(jnp.float32) * 1.001
    yb = grouped_matmul(xb, w32, gs, out_dtype=jnp.float32, impl=_impl(interpret))
    np.testing.assert_allclose(
        np.asarray(yb), np.asarray(grouped_matmul_reference(xb, w32, gs, out_dtype=jnp.float32)),
        rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------ gradients

# relative Frobenius error of the kernel path's gradients (bf16 dy, bf16-rounded results)
GRAD_TOL = 1e-2


def _grads(fn, x, w, dy):
    loss = lambda a, b: jnp.sum(fn(a, b) * dy)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def _pallas_names(fn, *args) -> set[str]:
    """Names of the Pallas kernels in ``fn``'s jaxpr (e.g. ``gmm_w16a16``, ``tgmm``)."""
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return set(re.findall(r"name=(gmm_w16a16|tgmm|gmm_tile_table)\b", jaxpr))


@pytest.mark.parametrize("groups", ["empty_experts_padding", "last_only_padding"])
def test_gradients_match_reference_gradients(groups, interpret):
    x, w, gs = _data(groups, 32, 16, seed=1)
    dy = jax.random.normal(jax.random.key(2), (x.shape[0], 16), jnp.float32)
    kern = lambda a, b: grouped_matmul(a, b, gs, out_dtype=jnp.float32,  # noqa: E731
                                       impl=_impl(interpret))
    got = _grads(kern, x, w, dy)
    want = _grads(lambda a, b: grouped_matmul_reference(a, b, gs, out_dtype=jnp.float32),
                  x, w, dy)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == r.dtype == jnp.bfloat16 and g.shape == r.shape
        assert _rel(g, r) < GRAD_TOL
    # and the formulas themselves (dx = grouped dy @ w^T, dw[e] = x_e^T dy_e) in float64
    dx, dw = np_grouped_grads(x, w, gs, dy)
    assert _rel(got[0], dx) < GRAD_TOL and _rel(got[1], dw) < GRAD_TOL
    assert not np.any(np.asarray(got[0], np.float32)[int(np.sum(gs)):])  # padding rows
    assert not np.any(np.asarray(got[1], np.float32)[np.asarray(gs) == 0])  # empty experts
    # the backward runs the Pallas kernels: gmm for dx, tgmm for dw
    grad_fn = jax.grad(lambda a, b: jnp.sum(kern(a, b) * dy), argnums=(0, 1))
    assert {"gmm_w16a16", "tgmm"} <= _pallas_names(grad_fn, x, w)


def test_reference_backward_by_context_is_exact(interpret):
    """kernel_backward("reference"): the kernel forward with the reference's own VJP."""
    x, w, gs = _data("empty_experts_padding", 32, 16, seed=1)
    dy = jax.random.normal(jax.random.key(2), (x.shape[0], 16), jnp.float32)
    kern = lambda a, b: grouped_matmul(a, b, gs, out_dtype=jnp.float32,  # noqa: E731
                                       impl=_impl(interpret))
    grad_fn = jax.jit(jax.grad(lambda a, b: jnp.sum(kern(a, b) * dy), argnums=(0, 1)))
    with kernel_backward("reference"):
        got = _grads(kern, x, w, dy)
        assert "tgmm" not in _pallas_names(grad_fn, x, w)
        ref_grads = grad_fn(x, w)
    want = _grads(lambda a, b: grouped_matmul_reference(a, b, gs, out_dtype=jnp.float32),
                  x, w, dy)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
    # the backward choice is in jit's cache key: outside the context the kernels' VJP again
    assert "tgmm" in _pallas_names(grad_fn, x, w)
    for g, r in zip(grad_fn(x, w), ref_grads, strict=True):
        assert _rel(g, r) < GRAD_TOL
    with pytest.raises(ValueError, match="bwd"):
        with kernel_backward("xla"):
            pass


def test_gradient_through_f32_master_weights(interpret):
    """f32 params cast to bf16 in the model: the cast's VJP brings dw back to f32."""
    x, w, gs = _data("empty_experts_padding", 32, 16, seed=3)
    w32 = w.astype(jnp.float32)

    def loss(impl):
        return lambda b: jnp.sum(grouped_matmul(x, b.astype(jnp.bfloat16), gs,
                                                out_dtype=jnp.float32, impl=impl) ** 2)

    got = jax.grad(loss(_impl(interpret)))(w32)
    want = jax.grad(loss("reference"))(w32)
    assert got.dtype == jnp.float32
    assert _rel(got, want) < GRAD_TOL


# ------------------------------------------------------------------------------------ MoE block

def _tiny_moe_cfg(**kw) -> ModelConfig:
    base = dict(model_type="qwen2_moe", vocab_size=32, hidden_size=32, num_layers=1,
                num_heads=2, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4,
                num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                intermediate_size=48, shared_intermediate_size=20, shared_expert_gate=True)
    return ModelConfig(**{**base, **kw})


def _bf16_block(cfg: ModelConfig, seed: int) -> moe.MoEBlock:
    block = moe.MoEBlock(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                         rngs=nnx.Rngs(seed))
    # larger than the 0.02 init so that routing and the experts matter to the output
    for name in ("gate", "up", "down"):
        p = getattr(block.experts, name)
        p[...] = p[...] * 20
    block.router.kernel[...] = block.router.kernel[...] * 50
    return block


def test_moe_block_interpret_vs_reference():
    block = _bf16_block(_tiny_moe_cfg(), seed=4)
    x = jax.random.normal(jax.random.key(5), (2, 9, 32), jnp.float32).astype(jnp.bfloat16)
    graph, state = nnx.split(block)
    outs = {}
    for mode in ("interpret", "reference"):
        with kernel_mode(mode):
            run = jax.jit(lambda st, v: nnx.merge(graph, st)(v))
            assert _uses_pallas(run, state, x) == (mode == "interpret")
            outs[mode] = np.asarray(run(state, x), np.float32)
    assert outs["interpret"].dtype == np.float32 and np.abs(outs["reference"]).max() > 1e-2
    # the same routing; the expert sums differ only in f32 summation order and bf16 roundings
    err = np.abs(outs["interpret"] - outs["reference"]).max()
    assert err <= 2e-2 * np.abs(outs["reference"]).max()


def test_moe_block_gradients_interpret_vs_reference():
    """Parameter gradients of a bf16 MoE block: Pallas backward (interpret) vs the reference."""
    block = _bf16_block(_tiny_moe_cfg(), seed=6)
    x = jax.random.normal(jax.random.key(7), (2, 9, 32), jnp.float32).astype(jnp.bfloat16)
    r = jax.random.normal(jax.random.key(8), (2, 9, 32), jnp.float32)
    graph, state = nnx.split(block)
    grads = {}
    for mode in ("interpret", "reference"):
        with kernel_mode(mode):
            loss = lambda st: jnp.sum(nnx.merge(graph, st)(x).astype(jnp.float32) * r)  # noqa: E731
            grads[mode] = jax.jit(jax.grad(loss))(state)
    for name in ("gate", "up", "down"):
        got = getattr(grads["interpret"]["experts"], name)[...]
        want = getattr(grads["reference"]["experts"], name)[...]
        assert np.abs(np.asarray(want, np.float32)).max() > 0
        assert _rel(got, want) < 2 * GRAD_TOL, name  # two chained bf16 backward matmuls


# ------------------------------------------------------------------------------------ the switch

def test_mode_switch_and_errors():
    x, w, gs = _data("one_expert", 16, 8)
    f = lambda a, b: grouped_matmul(a, b, gs)  # noqa: E731
    assert ops.get_kernel_mode() in ops.IMPLS
    with kernel_mode("interpret"):
        assert ops.get_kernel_mode() == "interpret" and _uses_pallas(f, x, w)
        # f32 inputs and an explicit precision keep the jnp path
        x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
        assert not _uses_pallas(f, x32, w32)
        assert not _uses_pallas(lambda a, b: grouped_matmul(
            a, b, gs, precision=jax.lax.Precision.HIGHEST), x, w)
        assert _uses_pallas(lambda a, b: grouped_matmul(
            a, b, gs, precision=jax.lax.Precision.DEFAULT), x, w)
        # the keyword beats the mode
        assert not _uses_pallas(lambda a, b: grouped_matmul(a, b, gs, impl="reference"), x, w)
    if not ON_GPU:
        assert not _uses_pallas(f, x, w)  # auto on the CPU: the reference
        with pytest.raises(ValueError, match="interpret"):
            grouped_matmul(x, w, gs, impl="kernel")
    with pytest.raises(ValueError, match="impl"):
        grouped_matmul(x, w, gs, impl="fast")
    with pytest.raises(ValueError, match="mode"):
        with kernel_mode("Kernel"):
            pass
    with pytest.raises(ValueError, match="mode"):
        ops.set_kernel_mode("pallas")


def test_mode_is_in_the_jit_cache_key():
    """A function jitted under one mode retraces under another (no stale path)."""
    x, w, gs = _data("one_expert", 16, 8)
    traces = []

    @jax.jit
    def f(a, b):
        traces.append(ops.get_kernel_mode())
        return grouped_matmul(a, b, gs, out_dtype=jnp.float32)

    f(x, w)
    with kernel_mode("interpret"):
        y = f(x, w)
    f(x, w)  # back to the first mode: cached, no new trace
    assert traces == [ops.get_kernel_mode(), "interpret"]
    assert _rel(y, np_grouped_matmul(x, w, gs)) < TOL[jnp.float32]


def test_set_kernel_mode_is_global():
    before = ops.get_kernel_mode()
    try:
        ops.set_kernel_mode("reference")
        assert ops.get_kernel_mode() == "reference"
        with kernel_mode("interpret"):
            assert ops.get_kernel_mode() == "interpret"
        assert ops.get_kernel_mode() == "reference"
    finally:
        ops.set_kernel_mode(before)
    assert ops.get_kernel_mode() == before


# ------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
def test_gpu_auto_uses_the_kernel_for_bf16_only():
    x, w, gs = _data("empty_experts_padding", 64, 32)
    f = lambda a, b: grouped_matmul(a, b, gs, out_dtype=jnp.float32)  # noqa: E731
    assert _uses_pallas(f, x, w)
    assert not _uses_pallas(f, x.astype(jnp.float32), w.astype(jnp.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [7, 300, 2048])
def test_gpu_kernel_forward_and_grads_larger(m):
    """Compiled kernel at shapes with many tiles (and split-K for few rows) vs the references."""
    e, k, n = 8, 256, 384
    key = jax.random.key(m)
    gs = np.bincount(np.random.default_rng(m).integers(0, e - 2, m - m // 7), minlength=e)
    gs = jnp.asarray(gs, jnp.int32)  # two empty experts, ~1/7 of the rows are padding
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.fold_in(key, 1), (e, k, n), jnp.float32) / 16).astype(
        jnp.bfloat16)
    dy = jax.random.normal(jax.random.fold_in(key, 2), (m, n), jnp.float32)
    y = jax.jit(lambda a, b: grouped_matmul(a, b, gs, out_dtype=jnp.float32, impl="kernel"))(x, w)
    assert _rel(y, np_grouped_matmul(x, w, gs)) < TOL[jnp.float32]

    def grads(impl):
        loss = lambda a, b: jnp.sum(  # noqa: E731
            grouped_matmul(a, b, gs, out_dtype=jnp.float32, impl=impl) * dy)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    got = grads("kernel")
    for g, r in zip(got, grads("reference"), strict=True):
        assert _rel(g, r) < GRAD_TOL
    dx, dw = np_grouped_grads(x, w, gs, dy)
    assert _rel(got[0], dx) < GRAD_TOL and _rel(got[1], dw) < GRAD_TOL
    assert not np.any(np.asarray(got[0], np.float32)[int(np.sum(gs)):])  # padding rows
    assert not np.any(np.asarray(got[1], np.float32)[e - 2:])  # the two empty experts


@pytest.mark.gpu
def test_gpu_whole_model_logits_kernel_vs_reference():
    from mxmoe_jax.models import MoECausalLM, from_flat_params, to_flat_params
    from tests.models.test_families import cfg_of

    cfg = cfg_of("qwen2_moe")
    flat = to_flat_params(MoECausalLM(cfg, rngs=nnx.Rngs(9)))
    model = from_flat_params(cfg, flat, jnp.bfloat16)
    ids = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (3, 17)), jnp.int32)
    logits = {}
    for mode in ("kernel", "reference"):
        with kernel_mode(mode):
            run = nnx.jit(lambda mdl, i: mdl(i))
            logits[mode] = np.asarray(run(model, ids), np.float32)
    assert np.all(np.isfinite(logits["kernel"]))
    scale = np.abs(logits["reference"]).max()
    assert np.abs(logits["kernel"] - logits["reference"]).max() <= 2e-2 * scale + 1e-3
