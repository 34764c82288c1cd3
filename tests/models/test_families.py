"""MoECausalLM per family: param layout, flat-params round trip, masks, attention numerics, dtypes.

End-to-end logit parity with transformers lives in the conversion tests (fixtures under
``tests/fixtures/hf``); here the attention is checked against a NumPy re-implementation written from
transformers' modeling files, and the model against properties (causality, sliding window).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models import (
    Attention,
    MoECausalLM,
    forward,
    forward_hidden,
    from_flat_params,
    param_shapes,
    to_flat_params,
)

RNG = np.random.default_rng(0)

BASE = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=500.0)
HF = {
    "qwen2_moe": {**BASE, "model_type": "qwen2_moe", "num_experts": 4, "intermediate_size": 24,
                  "moe_intermediate_size": 8, "shared_expert_intermediate_size": 12,
                  "mlp_only_layers": [1], "tie_word_embeddings": True},
    "qwen3_moe": {**BASE, "model_type": "qwen3_moe", "num_experts": 4, "head_dim": 16,
                  "intermediate_size": 24, "moe_intermediate_size": 8, "attention_bias": True},
    "mixtral": {**BASE, "model_type": "mixtral", "num_local_experts": 4, "intermediate_size": 8,
                "sliding_window": 3},
    "olmoe": {**BASE, "model_type": "olmoe", "num_experts": 4, "intermediate_size": 8,
              "clip_qkv": 0.3},
}


def cfg_of(name: str, **kw) -> ModelConfig:
    return ModelConfig.from_hf({**HF[name], **kw})


def test_param_layout():
    q2 = param_shapes(cfg_of("qwen2_moe"))
    assert "lm_head/kernel" not in q2 and q2["embed/embedding"] == (40, 32)
    assert q2["layers/0/attn/q_proj/bias"] == (32,) and "layers/0/attn/o_proj/bias" not in q2
    assert q2["layers/0/mlp/experts/gate"] == (4, 32, 8)
    assert q2["layers/0/mlp/experts/down"] == (4, 8, 32)
    assert q2["layers/0/mlp/router/kernel"] == (32, 4)
    assert q2["layers/0/mlp/shared/up_proj/kernel"] == (32, 12)
    assert q2["layers/0/mlp/shared_gate/kernel"] == (32, 1)
    assert q2["layers/1/mlp/gate_proj/kernel"] == (32, 24)  # mlp_only_layers=[1]: dense
    assert not any(k.startswith("layers/1/mlp/experts") for k in q2)
    q3 = param_shapes(cfg_of("qwen3_moe"))
    assert q3["layers/0/attn/q_proj/kernel"] == (32, 64) and q3["layers/0/attn/o_proj/bias"]
    assert q3["layers/0/attn/q_norm/scale"] == (16,) and q3["lm_head/kernel"] == (32, 40)
    ol = param_shapes(cfg_of("olmoe"))
    assert ol["layers/1/attn/q_norm/scale"] == (32,) and ol["layers/1/attn/k_norm/scale"] == (16,)
    mx = param_shapes(cfg_of("mixtral"))
    assert mx["layers/1/attn/k_proj/kernel"] == (32, 16)
    assert not any("norm" in k for k in mx if "/attn/" in k)
    assert not any("shared" in k for k in mx)


@pytest.mark.parametrize("name", list(HF))
def test_flat_params_round_trip(name):
    cfg = cfg_of(name)
    model = MoECausalLM(cfg, rngs=nnx.Rngs(0))
    flat = to_flat_params(model)
    assert {k: v.shape for k, v in flat.items()} == param_shapes(cfg)
    back = to_flat_params(from_flat_params(cfg, flat))
    assert back.keys() == flat.keys()
    assert all(np.array_equal(back[k], flat[k]) for k in flat)
    bf16 = from_flat_params(cfg, flat, jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in to_flat_params(bf16).values())


def test_from_flat_params_errors():
    cfg = cfg_of("mixtral")
    flat = to_flat_params(MoECausalLM(cfg, rngs=nnx.Rngs(0)))
    missing = {k: v for k, v in flat.items() if k != "final_norm/scale"}
    with pytest.raises(ValueError, match="missing.*final_norm/scale"):
        from_flat_params(cfg, missing)
    with pytest.raises(ValueError, match="unexpected.*layers/0/bogus"):
        from_flat_params(cfg, {**flat, "layers/0/bogus": np.zeros(3)})
    with pytest.raises(ValueError, match="wrong shape.*layers/0/mlp/experts/up"):
        from_flat_params(cfg, {**flat, "layers/0/mlp/experts/up": np.zeros((4, 8, 32))})


def _perturbed_logits(model, ids, pos):
    other = ids.at[:, pos].set((ids[:, pos] + 7) % model.cfg.vocab_size)
    return np.asarray(forward(model, ids)), np.asarray(forward(model, other))


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe"])
def test_causal(name):
    model = MoECausalLM(cfg_of(name), rngs=nnx.Rngs(1))
    ids = jnp.asarray(RNG.integers(0, 40, (2, 9)), jnp.int32)
    a, b = _perturbed_logits(model, ids, 5)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 0


def test_sliding_window_mask():
    # one layer, window 3: position t sees t-2..t only
    model = MoECausalLM(cfg_of("mixtral", num_hidden_layers=1), rngs=nnx.Rngs(2))
    ids = jnp.asarray(RNG.integers(0, 40, (1, 8)), jnp.int32)
    a, b = _perturbed_logits(model, ids, 1)
    assert np.abs(a[:, 1:4] - b[:, 1:4]).max() > 0
    np.testing.assert_array_equal(a[:, 4:], b[:, 4:])


# ------------------------------------------------------------- attention vs NumPy reference

def np_rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def np_rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def np_attention(attn: Attention, cfg: ModelConfig, x, window=None):
    """transformers' eager attention for one sequence x [T, D], float64."""
    p = {k: np.asarray(v, np.float64) for k, v in to_flat_params(attn).items()}
    t = x.shape[0]
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def lin(name):
        y = x @ p[f"{name}/kernel"]
        return y + p[f"{name}/bias"] if f"{name}/bias" in p else y

    q, k, v = lin("q_proj"), lin("k_proj"), lin("v_proj")
    if cfg.qk_norm == "full":
        q = np_rms(q, p["q_norm/scale"], cfg.rms_norm_eps)
        k = np_rms(k, p["k_norm/scale"], cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (np.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
    q, k, v = q.reshape(t, h, hd), k.reshape(t, kv, hd), v.reshape(t, kv, hd)
    if cfg.qk_norm == "head":
        q = np_rms(q, p["q_norm/scale"], cfg.rms_norm_eps)
        k = np_rms(k, p["k_norm/scale"], cfg.rms_norm_eps)
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    q = q * cos[:, None] + np_rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + np_rotate_half(k) * sin[:, None]
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # repeat_kv
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    allowed = np.tril(np.ones((t, t), bool))
    if window is not None:
        allowed &= np.arange(t)[None, :] > np.arange(t)[:, None] - window
    s = np.where(allowed, s, -np.inf)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    return lin_out(np.einsum("hts,shd->thd", pr, v).reshape(t, h * hd), p)


def lin_out(y, p):
    out = y @ p["o_proj/kernel"]
    return out + p["o_proj/bias"] if "o_proj/bias" in p else out


@pytest.mark.parametrize("name", list(HF))
def test_attention_vs_numpy(name):
    cfg = cfg_of(name)
    attn = Attention(cfg, 0, rngs=nnx.Rngs(4))
    # O(1) weights and non-trivial norm scales / biases, so every term shows in the output
    state = nnx.state(attn, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(5), 32))
    state = jax.tree.map(lambda a: (1.0 if a.ndim == 1 else 0.0) + jax.random.normal(
        next(keys), a.shape) * (0.3 if a.ndim == 1 else a.shape[0] ** -0.5), state)
    nnx.update(attn, state)
    x = RNG.normal(size=(2, 7, 32)).astype(np.float32)
    y = nnx.jit(lambda m, v: m(v, jnp.arange(7)))(attn, jnp.asarray(x))
    for b in range(2):
        ref = np_attention(attn, cfg, x[b].astype(np.float64), cfg.layer_sliding_window(0))
        np.testing.assert_allclose(np.asarray(y[b]), ref, rtol=1e-4, atol=1e-5)
    # [B, T] positions give the same result as [T]
    y2 = attn(jnp.asarray(x), jnp.broadcast_to(jnp.arange(7), (2, 7)))
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-6, atol=1e-6)


def test_standard_attention_rejects_rope_scaling():
    cfg = dataclasses.replace(cfg_of("mixtral"), rope_scaling={"rope_type": "dynamic"})
    with pytest.raises(ValueError, match="dynamic"):
        Attention(cfg, 0, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------- dtypes, jit

def test_forward_bf16_close_to_fp32():
    cfg = cfg_of("qwen2_moe")
    m32 = MoECausalLM(cfg, rngs=nnx.Rngs(6))
    flat = to_flat_params(m32)
    m16 = from_flat_params(cfg, flat, jnp.bfloat16)
    ids = jnp.asarray(RNG.integers(0, 40, (2, 6)), jnp.int32)
    l32, l16 = forward(m32, ids), forward(m16, ids)
    assert l32.dtype == jnp.float32 and l16.dtype == jnp.float32 and l16.shape == (2, 6, 40)
    assert bool(jnp.all(jnp.isfinite(l16)))
    # 0.02-scale random weights: logits are small; bf16 keeps ~3 significant digits
    assert float(jnp.abs(l16 - l32).max()) <= 2e-2 * float(jnp.abs(l32).max()) + 1e-3


@pytest.mark.skipif(importlib.util.find_spec("mxmoe_jax.models.mla") is None,
                    reason="mxmoe_jax/models/mla.py (DeepSeek-V2 attention) is not there yet")
def test_deepseek_v2_builds_with_mla():
    hf = {**BASE, "model_type": "deepseek_v2", "n_routed_experts": 4, "n_shared_experts": 1,
          "moe_intermediate_size": 8, "intermediate_size": 24, "first_k_dense_replace": 1,
          "q_lora_rank": None, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
          "v_head_dim": 8, "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}
    cfg = ModelConfig.from_hf(hf)
    shapes = param_shapes(cfg)
    assert shapes["layers/0/mlp/gate_proj/kernel"] == (32, 24)
    assert shapes["layers/1/mlp/shared/gate_proj/kernel"] == (32, 8)
    assert shapes["layers/1/attn/kv_b_proj/kernel"] == (8, 4 * (8 + 8))
    model = MoECausalLM(cfg, rngs=nnx.Rngs(7))
    logits = forward(model, jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, 40) and bool(jnp.all(jnp.isfinite(logits)))


def test_forward_hidden_captures_moe_inputs():
    cfg = cfg_of("qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1])
    model = MoECausalLM(cfg, rngs=nnx.Rngs(8))
    ids = jnp.asarray(RNG.integers(0, 40, (2, 6)), jnp.int32)
    logits, cap = forward_hidden(model, ids)
    assert sorted(cap) == [0, 2]  # default: the MoE layers
    np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(model, ids)), atol=1e-6)
    # an eager walk through the layers: each MoE block's input is post_attn_norm(x + attn)
    x, pos = model.embed_tokens(ids), jnp.arange(6)
    for i, layer in enumerate(model.layers):
        h = x + layer.attn(layer.input_norm(x), pos)
        if i in cap:
            np.testing.assert_allclose(np.asarray(cap[i]), np.asarray(layer.post_attn_norm(h)),
                                       rtol=1e-5, atol=1e-6)
        x = h + layer.mlp(layer.post_attn_norm(h))
    none, early = forward_hidden(model, ids, capture=[0], with_logits=False)
    assert none is None and list(early) == [0]
    np.testing.assert_allclose(np.asarray(early[0]), np.asarray(cap[0]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="capture"):
        forward_hidden(model, ids, capture=[3])
