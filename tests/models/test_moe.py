"""Routing, dispatch, grouped_matmul and the MoE block against small NumPy re-implementations.

The references are written from transformers' router code (softmax in f32, ``torch.topk``, optional
renormalisation; DeepSeek-V2's group mask) and a per-token loop over the chosen experts, never from
the code under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models import moe
from mxmoe_jax.ops import grouped_matmul, grouped_matmul_reference, ragged_dot_tiled

RNG = np.random.default_rng(0)


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_topk(scores, k):
    """Indices of the k largest per row, largest first (scores are tie-free random floats)."""
    idx = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, -1)


def np_silu(x):
    return x / (1 + np.exp(-x))


def sort_slots(idx, w):
    """Order each token's (expert, weight) pairs by expert so sets compare regardless of order."""
    o = np.argsort(idx, axis=-1)
    return np.take_along_axis(idx, o, -1), np.take_along_axis(w, o, -1)


@pytest.mark.parametrize("normalize", [False, True])
def test_softmax_topk(normalize):
    logits = RNG.normal(size=(33, 8)).astype(np.float32)
    idx, w = moe.softmax_topk(jnp.asarray(logits), 3, normalize=normalize)
    ref_idx, ref_w = np_topk(np_softmax(logits.astype(np.float64)), 3)
    if normalize:
        ref_w = ref_w / ref_w.sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(idx), ref_idx)
    np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-5, atol=1e-6)
    assert idx.dtype == jnp.int32 and w.dtype == jnp.float32


def test_mixtral_routing_is_softmax_over_topk_logits():
    logits = RNG.normal(size=(20, 8)).astype(np.float32)
    _, w = moe.softmax_topk(jnp.asarray(logits), 2, normalize=True)
    ref_idx, top_logits = np_topk(logits, 2)
    np.testing.assert_allclose(np.asarray(w), np_softmax(top_logits.astype(np.float64)),
                               rtol=1e-5)


def test_ds_greedy():
    logits = RNG.normal(size=(17, 16)).astype(np.float32)
    idx, w = moe.ds_greedy(jnp.asarray(logits), 6, scaling=16.0)
    ref_idx, ref_w = np_topk(np_softmax(logits.astype(np.float64)), 6)
    a = sort_slots(np.asarray(idx), np.asarray(w))  # torch.topk(sorted=False): order is free
    b = sort_slots(ref_idx, ref_w * 16.0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)


def np_group_limited(logits, k, n_group, topk_group, scaling):
    t, e = logits.shape
    scores = np_softmax(logits.astype(np.float64))
    out_idx, out_w = [], []
    for row in scores:
        group_max = row.reshape(n_group, e // n_group).max(-1)
        keep_groups = np.argsort(-group_max)[:topk_group]
        masked = np.zeros_like(row)
        for g in keep_groups:
            sl = slice(g * (e // n_group), (g + 1) * (e // n_group))
            masked[sl] = row[sl]
        top = np.argsort(-masked)[:k]
        out_idx.append(top)
        out_w.append(masked[top] * scaling)
    return np.array(out_idx), np.array(out_w)


def test_ds_group_limited_greedy():
    logits = (3 * RNG.normal(size=(40, 16))).astype(np.float32)
    idx, w = moe.ds_group_limited_greedy(jnp.asarray(logits), 4, n_group=4, topk_group=2,
                                         scaling=2.5)
    ref = np_group_limited(logits, 4, 4, 2, 2.5)
    a, b = sort_slots(np.asarray(idx), np.asarray(w)), sort_slots(*ref)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
    # every chosen expert lies in one of the topk_group kept groups
    assert all(len(set(row // 4)) <= 2 for row in np.asarray(idx))


def np_grouped_matmul(x, w, group_sizes):
    out = np.zeros((x.shape[0], w.shape[2]), np.float64)
    start = 0
    for e, n in enumerate(group_sizes):
        out[start:start + n] = x[start:start + n].astype(np.float64) @ w[e].astype(np.float64)
        start += n
    return out


@pytest.mark.parametrize("group_sizes", [[3, 0, 5, 0], [0, 0, 0, 8], [2, 2, 2, 0]],
                         ids=["empty-experts", "one-expert", "padding-rows"])
def test_grouped_matmul_vs_loop(group_sizes):
    x = RNG.normal(size=(8, 12)).astype(np.float32)
    w = RNG.normal(size=(4, 12, 5)).astype(np.float32)
    gs = np.array(group_sizes, np.int32)
    for fn in (grouped_matmul, grouped_matmul_reference):
        y = jax.jit(fn)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gs))
        assert y.shape == (8, 5) and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), np_grouped_matmul(x, w, gs), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("block_m", [1, 4, 64])
@pytest.mark.parametrize("group_sizes", [[100, 0, 1, 130, 60], [0, 0, 0, 0, 0], [0, 0, 0, 0, 291]],
                         ids=["mixed", "all-empty", "last-only"])
def test_grouped_matmul_tiled_vs_loop(group_sizes, block_m):
    # M = 300 rows; sum(group_sizes) <= M, the rest is padding that must come out as zeros
    x = RNG.normal(size=(300, 16)).astype(np.float32)
    w = RNG.normal(size=(5, 16, 8)).astype(np.float32)
    gs = np.array(group_sizes, np.int32)
    fn = jax.jit(ragged_dot_tiled, static_argnames=("block_m", "precision"))
    y = fn(jnp.asarray(x), jnp.asarray(w), jnp.asarray(gs), block_m=block_m,
           precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np_grouped_matmul(x, w, gs), rtol=1e-5, atol=1e-4)


def test_grouped_matmul_tiled_gradients_match_reference():
    x = jnp.asarray(RNG.normal(size=(50, 8)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(4, 8, 6)), jnp.float32)
    gs = jnp.asarray([20, 0, 25, 3], jnp.int32)
    c = jnp.asarray(RNG.normal(size=(50, 6)), jnp.float32)

    def grads(fn):
        return jax.grad(lambda a, b: jnp.sum(fn(a, b, gs) * c), argnums=(0, 1))(x, w)

    got = grads(lambda a, b, g: ragged_dot_tiled(a, b, g, block_m=8,
                                                 precision=jax.lax.Precision.HIGHEST))
    want = grads(grouped_matmul_reference)
    for u, v in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-5)


def test_grouped_matmul_bf16_accumulates_in_f32():
    x = RNG.normal(size=(16, 256)).astype(np.float32)
    w = RNG.normal(size=(2, 256, 8)).astype(np.float32)
    gs = np.array([9, 7], np.int32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y = grouped_matmul(xb, wb, jnp.asarray(gs), out_dtype=jnp.float32)
    ref = np_grouped_matmul(np.asarray(xb, np.float32), np.asarray(wb, np.float32), gs)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-3)
    assert grouped_matmul(xb, wb, jnp.asarray(gs)).dtype == jnp.bfloat16


def test_grouped_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.ones((3,), jnp.int32))
    with pytest.raises(ValueError, match="K="):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 4, 5)), jnp.ones((2,), jnp.int32))


def test_dispatch_invariants():
    t, k, e = 11, 3, 5
    idx = np.stack([RNG.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    x = RNG.normal(size=(t, 4)).astype(np.float32)
    d = moe.dispatch(jnp.asarray(x), jnp.asarray(idx), e)
    order, token = np.asarray(d.order), np.asarray(d.token)
    assert sorted(order.tolist()) == list(range(t * k))
    experts = idx.reshape(-1)[order]
    assert np.all(np.diff(experts) >= 0)
    np.testing.assert_array_equal(np.asarray(d.group_sizes), np.bincount(idx.reshape(-1),
                                                                           minlength=e))
    np.testing.assert_array_equal(np.asarray(d.x_sorted), x[token])
    np.testing.assert_array_equal(token, order // k)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(model_type="qwen2_moe", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12,
                intermediate_size=24)
    return ModelConfig(**{**base, **kw})


CASES = {
    "qwen2_shared_gate": dict(shared_intermediate_size=10, shared_expert_gate=True),
    "qwen3_norm": dict(model_type="qwen3_moe", norm_topk_prob=True, num_experts_per_tok=3),
    "mixtral": dict(model_type="mixtral", norm_topk_prob=True),
    "ds2_group_limited": dict(model_type="deepseek_v2", router="ds_group_limited", n_group=3,
                              topk_group=2, routed_scaling_factor=2.0, num_experts_per_tok=3,
                              shared_intermediate_size=24, kv_lora_rank=8, qk_rope_head_dim=4,
                              qk_nope_head_dim=4, v_head_dim=8),
}


def np_route(logits, cfg):
    if cfg.router == "ds_group_limited":
        return np_group_limited(logits, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                                cfg.routed_scaling_factor)
    idx, w = np_topk(np_softmax(logits), cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdims=True)
    return idx, w * cfg.routed_scaling_factor


def np_moe_block(block: moe.MoEBlock, x):
    """A dense per-token loop: every token through each chosen expert, weighted, plus shared."""
    p = {k: np.asarray(v, np.float64) for k, v in {
        "router": block.router.kernel[...], "gate": block.experts.gate[...],
        "up": block.experts.up[...], "down": block.experts.down[...]}.items()}
    cfg = block.cfg
    x = x.astype(np.float64)
    idx, w = np_route(x @ p["router"], cfg)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, wt in zip(idx[t], w[t], strict=True):
            h = np_silu(x[t] @ p["gate"][e]) * (x[t] @ p["up"][e])
            out[t] += wt * (h @ p["down"][e])
    if cfg.shared_intermediate_size:
        s = block.shared
        g, u, dn = (np.asarray(m.kernel[...], np.float64)
                    for m in (s.gate_proj, s.up_proj, s.down_proj))
        shared = (np_silu(x @ g) * (x @ u)) @ dn
        if cfg.shared_expert_gate:
            shared = shared / (1 + np.exp(-(x @ np.asarray(block.shared_gate.kernel[...]))))
        out += shared
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_moe_block_vs_per_token_loop(case):
    cfg = tiny_cfg(**CASES[case])
    block = moe.MoEBlock(cfg, rngs=nnx.Rngs(1))
    # larger weights than the 0.02 init, so routing and experts matter to the output
    for name in ("gate", "up", "down"):
        p = getattr(block.experts, name)
        p[...] = p[...] * 20
    block.router.kernel[...] = block.router.kernel[...] * 50
    x = RNG.normal(size=(2, 7, 16)).astype(np.float32)
    y = nnx.jit(lambda b, v: b(v))(block, jnp.asarray(x))
    assert y.shape == x.shape and y.dtype == jnp.float32
    ref = np_moe_block(block, x.reshape(-1, 16)).reshape(x.shape)
    assert np.abs(ref).max() > 1e-2  # the check is not vacuous
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-5)


def test_substituted_weights_and_hooks():
    cfg = tiny_cfg(**CASES["qwen2_shared_gate"])
    block = moe.MoEBlock(cfg, rngs=nnx.Rngs(2))
    x = jnp.asarray(RNG.normal(size=(9, 16)), jnp.float32)

    def run(b, v, routed=None, act=None):
        cap = {}
        out = moe.moe_forward(b, v, routed=routed, hooks=moe.Hooks(act_quant=act, capture=cap))
        return out, cap

    run_j = nnx.jit(run, static_argnames="act")
    base, cap = run_j(block, x)
    seen = []

    def hook(rows, block_name, experts):
        seen.append((block_name, rows.shape, experts.shape))
        return rows

    np.testing.assert_allclose(np.asarray(run_j(block, x, act=hook)[0]), np.asarray(base),
                               rtol=1e-6)
    # routed rows (18 = 9 tokens x 2 slots), then the shared expert's 9 rows
    assert seen == [("gate", (18, 16), (18,)), ("up", (18, 16), (18,)), ("down", (18, 12), (18,)),
                    ("gate", (9, 16), (9,)), ("up", (9, 16), (9,)), ("down", (9, 10), (9,))]
    # captures: the routed and shared intermediates; y of the shared expert is its output
    assert cap["routed"]["h"].shape == (18, 12) and cap["shared"]["x"].shape == (9, 16)
    shared_only = np.asarray(cap["shared_weight"])[:, None] * np.asarray(cap["shared"]["y"])
    routed_only = moe.combine(cap["routed"]["y"], cap["dispatch"], cap["topk_weight"])
    np.testing.assert_allclose(np.asarray(routed_only) + shared_only, np.asarray(base),
                               rtol=1e-5, atol=1e-6)
    # the shared expert is expert E = 6 to the hooks: zero its down rows only
    zero_shared = run_j(block, x, act=lambda r, b, e: jnp.where(
        (e == cfg.num_experts)[:, None] & (b == "down"), 0.0, r))[0]
    np.testing.assert_allclose(np.asarray(zero_shared), np.asarray(routed_only), rtol=1e-5,
                               atol=1e-6)
    # doubled down weights -> doubled routed output
    w = block.experts.weights()
    doubled = moe.ExpertWeights.dense(*w.gate_up[0].w, 2 * w.down[0].w)
    got = run_j(block, x, routed=doubled)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(base + routed_only), rtol=1e-5,
                               atol=1e-6)


def test_padded_layout_equals_sorted():
    cfg = tiny_cfg(**CASES["qwen2_shared_gate"])
    block = moe.MoEBlock(cfg, rngs=nnx.Rngs(4))
    block.router.kernel[...] = block.router.kernel[...] * 50
    x = jnp.asarray(RNG.normal(size=(13, 16)), jnp.float32)
    sorted_ = nnx.jit(lambda b, v: moe.moe_forward(b, v))(block, x)
    padded = nnx.jit(lambda b, v: moe.moe_forward(b, v, layout="padded", capacity=16))(block, x)
    np.testing.assert_allclose(np.asarray(padded), np.asarray(sorted_), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_moe_block_jit_dtypes(dtype):
    cfg = tiny_cfg(**CASES["qwen2_shared_gate"])
    ref_block = moe.MoEBlock(cfg, rngs=nnx.Rngs(3))
    ref_block.router.kernel[...] = ref_block.router.kernel[...] * 50  # clear routing margins
    block = moe.MoEBlock(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(3))
    nnx.update(block, jax.tree.map(lambda a: a.astype(dtype), nnx.state(ref_block, nnx.Param)))
    x = jnp.asarray(RNG.normal(size=(3, 5, 16)), jnp.float32)
    y = nnx.jit(lambda b, v: b(v))(block, x.astype(dtype))
    assert y.dtype == dtype and bool(jnp.all(jnp.isfinite(y)))
    y32 = nnx.jit(lambda b, v: b(v))(ref_block, x)
    # the same weights up to bf16 rounding of params and activations
    tol = 1e-6 if dtype == jnp.float32 else 3e-2 * float(jnp.abs(y32).max())
    assert float(jnp.abs(y.astype(jnp.float32) - y32).max()) <= tol
