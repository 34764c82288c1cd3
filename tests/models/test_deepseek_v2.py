"""DeepSeek-V2 pieces against independent NumPy references: YaRN, MLA attention, DS2 routing.

The references below are written from the formulas (float64, explicit loops over heads), not from
``mxmoe_jax.models.mla``. End-to-end logit parity with transformers on the DS2 fixtures lives in
the conversion tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models import param_shapes
from mxmoe_jax.models.mla import MLAttention, mla_rope, mla_softmax_scale, yarn_inv_freq
from mxmoe_jax.models.moe import route

# DeepSeek-V2-Lite's rope block (its config.json on the hub, legacy spelling)
LITE_ROPE = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def ds2_hf_config(**overrides) -> dict:
    """A tiny DeepSeek-V2 config.json dict (transformers 5 spelling unless overridden)."""
    hf = dict(
        model_type="deepseek_v2", vocab_size=64, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
        moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
        first_k_dense_replace=1, moe_layer_freq=1, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=False,
        scoring_func="softmax", q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, attention_bias=False, rms_norm_eps=1e-6,
        max_position_embeddings=163840, hidden_act="silu",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096})
    hf.update(overrides)
    return hf


# ------------------------------------------------------------------------- NumPy references

def yarn_reference(dim, base, factor, orig_max, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN "NTK-by-parts" (arXiv 2309.00071 §3.2) in float64, as transformers parameterises it:
    dimension pair i keeps theta_i while it rotates > beta_fast times over the original context,
    becomes theta_i / factor below beta_slow rotations, with a linear ramp in i in between."""
    theta = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim/2]

    def index_with_rotations(n):  # solve orig_max * theta_i / (2 pi) = n for i (as 2i/dim)
        return dim * np.log(orig_max / (2 * np.pi * n)) / (2 * np.log(base))

    lo, hi = index_with_rotations(beta_fast), index_with_rotations(beta_slow)
    if truncate:
        lo, hi = np.floor(lo), np.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    gamma = np.clip((np.arange(dim // 2) - lo) / (hi - lo), 0.0, 1.0)  # 0: keep, 1: interpolate
    return theta * (1 - gamma) + theta / factor * gamma


def mscale_reference(factor, m):
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def rms_ref(x, w, eps=1e-6):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rotate_pairs(v, cos, sin):
    """Rotate each adjacent pair ``(v[:, 2i], v[:, 2i+1])`` by the angle of ``cos/sin[:, i]``."""
    re, im = v[:, 0::2], v[:, 1::2]
    res = np.empty_like(v)
    res[:, 0::2] = re * cos - im * sin
    res[:, 1::2] = re * sin + im * cos
    return res


def mla_reference(p, x, positions, *, heads, nope, rope, vdim, kv_rank, inv_freq, att, scale):
    """MLA in float64, one head at a time. ``p``: name -> array ([in, out] kernels)."""
    x = x.astype(np.float64)
    b_, t_, _ = x.shape

    def lin(name, a):
        return a @ p[f"{name}/kernel"] + p.get(f"{name}/bias", 0.0)

    if "q_proj/kernel" in p:
        q = lin("q_proj", x)
    else:
        q = lin("q_b_proj", rms_ref(lin("q_a_proj", x), p["q_a_norm/scale"]))
    kv_a = lin("kv_a_proj", x)
    c, k_pe = kv_a[..., :kv_rank], kv_a[..., kv_rank:]
    kv = lin("kv_b_proj", rms_ref(c, p["kv_a_norm/scale"]))
    out = np.zeros((b_, t_, heads * vdim))
    for b in range(b_):
        ang = positions[b][:, None] * inv_freq[None, :]  # [t, rope/2]
        cos, sin = np.cos(ang) * att, np.sin(ang) * att
        k_rot = _rotate_pairs(k_pe[b], cos, sin)  # [t, rope]
        for h in range(heads):
            qh = q[b, :, h * (nope + rope):(h + 1) * (nope + rope)]
            kvh = kv[b, :, h * (nope + vdim):(h + 1) * (nope + vdim)]
            q_rot = _rotate_pairs(qh[:, nope:], cos, sin)
            s = (qh[:, :nope] @ kvh[:, :nope].T + q_rot @ k_rot.T) * scale
            s = np.where(np.tril(np.ones((t_, t_), bool)), s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[b, :, h * vdim:(h + 1) * vdim] = w @ kvh[:, nope:]
    return lin("o_proj", out)


@nnx.jit
def _apply(module, x, positions):
    return module(x, positions)


def _flat(module) -> dict[str, np.ndarray]:
    state = nnx.state(module, nnx.Param)
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def _random_mla(cfg: ModelConfig, seed: int, dtype=jnp.float32) -> MLAttention:
    """An MLAttention whose every parameter matters: kernels ~ N(0, 1/fan_in), norm scales
    1 + N(0, 0.2), biases N(0, 0.1). Built abstractly (no eager random init: fast on CPU)."""
    abstract = nnx.eval_shape(lambda: MLAttention(cfg, 0, dtype=dtype, param_dtype=dtype,
                                                  rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        shape = var.shape
        if path[-1] == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif path[-1] == "bias":
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[0])
        leaves.append((path, var.replace(jnp.asarray(value, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


# ------------------------------------------------------------------------------------ YaRN

@pytest.mark.parametrize("dim,base,factor,orig,bf,bs,truncate", [
    (64, 10000.0, 40.0, 4096, 32.0, 1.0, True),  # DeepSeek-V2-Lite's real rope head
    (8, 10000.0, 40.0, 4096, 32.0, 1.0, True),  # the tiny fixtures' head
    (32, 500000.0, 8.0, 8192, 16.0, 2.0, False),  # untruncated ramp
    (16, 10000.0, 4.0, 64, 32.0, 1.0, True),  # short context: ramp clamped at index 0
])
def test_yarn_inv_freq_matches_formula(dim, base, factor, orig, bf, bs, truncate):
    got = yarn_inv_freq(dim=dim, base=base, factor=factor, original_max_position_embeddings=orig,
                        beta_fast=bf, beta_slow=bs, truncate=truncate)
    want = yarn_reference(dim, base, factor, orig, bf, bs, truncate)
    assert got.dtype == np.float32 and got.shape == (dim // 2,)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    # the fastest pair always extrapolates (theta_0 = 1); the slowest is interpolated by factor
    assert got[0] == np.float32(1.0)
    np.testing.assert_allclose(got[-1], base ** (-(dim - 2) / dim) / factor, rtol=2e-6)


def test_rope_and_scale_for_deepseek_v2_lite_config():
    # legacy hub spelling: rope_scaling {"type": "yarn"} beside a top-level rope_theta
    hf = ds2_hf_config(rope_scaling=LITE_ROPE, rope_theta=10000.0, qk_nope_head_dim=128,
                       qk_rope_head_dim=64)
    del hf["rope_parameters"]
    cfg = ModelConfig.from_hf(hf)
    inv_freq, att = mla_rope(cfg)
    np.testing.assert_allclose(inv_freq, yarn_reference(64, 10000.0, 40.0, 4096), rtol=2e-6)
    assert att == pytest.approx(1.0)  # mscale == mscale_all_dim
    # transformers: qk_head_dim**-0.5 * mscale(40, 0.707)**2
    want = 192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2
    assert mla_softmax_scale(cfg) == pytest.approx(want, rel=1e-12)
    # the transformers 5 spelling of the same block gives the same numbers
    cfg5 = ModelConfig.from_hf(ds2_hf_config(qk_nope_head_dim=128, qk_rope_head_dim=64))
    np.testing.assert_array_equal(mla_rope(cfg5)[0], inv_freq)
    assert mla_softmax_scale(cfg5) == mla_softmax_scale(cfg)


@pytest.mark.parametrize("rope,att,scale_mult", [
    # attention_factor = mscale(f, mscale) / mscale(f, mscale_all_dim); scale uses mscale_all_dim
    ({"mscale": 1.0, "mscale_all_dim": 0.5, "factor": 16.0},
     mscale_reference(16, 1.0) / mscale_reference(16, 0.5), mscale_reference(16, 0.5) ** 2),
    # neither given: attention_factor = mscale(f); the softmax scale is left alone
    ({"factor": 4.0}, mscale_reference(4, 1.0), 1.0),
    # an explicit attention_factor wins
    ({"factor": 4.0, "attention_factor": 0.9, "mscale_all_dim": 1.0}, 0.9,
     mscale_reference(4, 1.0) ** 2),
])
def test_yarn_attention_factor_and_softmax_scale(rope, att, scale_mult):
    params = {"rope_type": "yarn", "rope_theta": 10000.0,
              "original_max_position_embeddings": 1024, **rope}
    cfg = ModelConfig.from_hf(ds2_hf_config(rope_parameters=params))
    assert mla_rope(cfg)[1] == pytest.approx(att, rel=1e-12)
    assert mla_softmax_scale(cfg) == pytest.approx(24 ** -0.5 * scale_mult, rel=1e-12)


def test_default_rope_and_unsupported_rope_type():
    cfg = ModelConfig.from_hf(ds2_hf_config(rope_parameters={"rope_type": "default",
                                                             "rope_theta": 5000.0}))
    inv_freq, att = mla_rope(cfg)
    np.testing.assert_allclose(inv_freq, 5000.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    assert att == 1.0 and mla_softmax_scale(cfg) == pytest.approx(24 ** -0.5)
    cfg = ModelConfig.from_hf(ds2_hf_config(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0}))
    with pytest.raises(ValueError, match="llama3"):
        MLAttention(cfg, 0, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------- MLA

MLA_CASES = {
    "qlora": dict(q_lora_rank=24),
    "no_qlora": dict(q_lora_rank=None),
    # attention_factor != 1 (scales the rope part of each score by its square) and biases
    "qlora_bias_attfactor": dict(q_lora_rank=24, attention_bias=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "mscale": 1.0,
        "mscale_all_dim": 0.5, "original_max_position_embeddings": 512}),
}


@pytest.mark.parametrize("case", list(MLA_CASES))
def test_mla_matches_numpy_reference(case):
    hf = ds2_hf_config(**MLA_CASES[case])
    cfg = ModelConfig.from_hf(hf)
    attn = _random_mla(cfg, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, cfg.hidden_size)).astype(np.float32)
    # a different offset per sequence: positions [B, T] reach the rope
    positions = np.stack([np.arange(9), np.arange(9) + 1000]).astype(np.int32)
    got = _apply(attn, jnp.asarray(x), jnp.asarray(positions))

    rope = hf["rope_parameters"]
    orig = rope["original_max_position_embeddings"]
    inv_freq = yarn_reference(8, 10000.0, rope["factor"], orig)
    if "mscale_all_dim" in rope and "mscale" in rope:
        att = (mscale_reference(rope["factor"], rope["mscale"])
               / mscale_reference(rope["factor"], rope["mscale_all_dim"]))
    else:
        att = mscale_reference(rope["factor"], 1.0)
    scale = 24 ** -0.5 * mscale_reference(rope["factor"], rope["mscale_all_dim"]) ** 2
    want = mla_reference(_flat(attn), x, positions.astype(np.float64), heads=4, nope=16, rope=8,
                         vdim=12, kv_rank=16, inv_freq=inv_freq, att=att, scale=scale)
    assert got.shape == (2, 9, cfg.hidden_size) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=3e-5, rtol=1e-5)


def test_mla_is_causal_and_positions_default_to_broadcast():
    cfg = ModelConfig.from_hf(ds2_hf_config(q_lora_rank=None))
    attn = _random_mla(cfg, seed=3)
    x = jax.random.normal(jax.random.key(0), (2, 6, cfg.hidden_size))
    pos = jnp.arange(6, dtype=jnp.int32)
    y = _apply(attn, x, pos)
    y_later_changed = _apply(attn, x.at[:, 4:].add(1.0), pos)
    np.testing.assert_array_equal(np.asarray(y[:, :4]), np.asarray(y_later_changed[:, :4]))
    assert not np.allclose(np.asarray(y[:, 4:]), np.asarray(y_later_changed[:, 4:]))
    # [T] positions == the same [B, T] positions
    np.testing.assert_allclose(np.asarray(_apply(attn, x, jnp.tile(pos, (2, 1)))), np.asarray(y),
                               rtol=0, atol=0)


def test_mla_bf16_close_to_fp32():
    cfg = ModelConfig.from_hf(ds2_hf_config())
    attn = _random_mla(cfg, seed=4)
    attn16 = _random_mla(cfg, seed=4, dtype=jnp.bfloat16)  # the same draws, rounded to bf16
    x = jax.random.normal(jax.random.key(1), (1, 8, cfg.hidden_size))
    y32 = np.asarray(_apply(attn, x, jnp.arange(8)))
    y16 = _apply(attn16, x.astype(jnp.bfloat16), jnp.arange(8))
    assert y16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(y16, np.float32) - y32).max() / np.abs(y32).max()
    assert err < 5e-2


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_mla_param_paths_and_shapes_follow_the_contract(q_lora_rank):
    cfg = ModelConfig.from_hf(ds2_hf_config(q_lora_rank=q_lora_rank))
    d, h, qk, kvr, r, v = 32, 4, 24, 16, 8, 12
    q = ({"q_a_proj/kernel": (d, 24), "q_a_norm/scale": (24,), "q_b_proj/kernel": (24, h * qk)}
         if q_lora_rank else {"q_proj/kernel": (d, h * qk)})
    want = {**q, "kv_a_proj/kernel": (d, kvr + r), "kv_a_norm/scale": (kvr,),
            "kv_b_proj/kernel": (kvr, h * (16 + v)), "o_proj/kernel": (h * v, d)}
    shapes = param_shapes(cfg)
    for i in range(cfg.num_layers):
        got = {k.removeprefix(f"layers/{i}/attn/"): s for k, s in shapes.items()
               if k.startswith(f"layers/{i}/attn/")}
        assert got == want
    # layer 0 is dense (first_k_dense_replace=1), later layers MoE with 2 shared experts
    assert shapes["layers/0/mlp/gate_proj/kernel"] == (d, 48)
    assert shapes["layers/1/mlp/experts/gate"] == (8, d, 16)
    assert shapes["layers/2/mlp/shared/up_proj/kernel"] == (d, 2 * 16)


# --------------------------------------------------------------------------------- routing

def ds2_route_reference(logits, k, *, n_group, topk_group, scaling):
    """transformers' DeepseekV2TopkRouter (greedy when n_group == 1), one token at a time."""
    idx, weight = [], []
    for row in logits.astype(np.float64):
        p = np.exp(row - row.max())
        p /= p.sum()
        groups = p.reshape(n_group, -1)
        keep = np.argsort(-groups.max(axis=1), kind="stable")[:topk_group]
        masked = np.zeros_like(groups)
        masked[keep] = groups[keep]
        top = np.argsort(-masked.reshape(-1), kind="stable")[:k]
        idx.append(top)
        weight.append(p[top] * scaling)
    return np.array(idx), np.array(weight)


@pytest.mark.parametrize("method,n_group,topk_group,k", [
    ("group_limited_greedy", 4, 2, 3),
    ("group_limited_greedy", 8, 1, 1),
    ("greedy", 1, 1, 3),
])
def test_ds2_routing_matches_transformers_semantics(method, n_group, topk_group, k):
    cfg = ModelConfig.from_hf(ds2_hf_config(topk_method=method, n_group=n_group,
                                            topk_group=topk_group, num_experts_per_tok=k,
                                            routed_scaling_factor=1.5))
    logits = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32) * 2
    idx, weight = route(jnp.asarray(logits), cfg)
    want_idx, want_w = ds2_route_reference(logits, k, n_group=n_group, topk_group=topk_group,
                                           scaling=1.5)
    # the order of the k slots does not matter to the MoE output: compare per token, sorted
    order = np.argsort(np.asarray(idx), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, 1),
                                  np.sort(want_idx, axis=1))
    want_order = np.argsort(want_idx, axis=1)
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weight), order, 1),
                               np.take_along_axis(want_w, want_order, 1), rtol=1e-6)
