"""The fake-quant forward: per-(layer, expert, block) schemes against a per-token NumPy loop."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mxmoe_jax.quant.fakequant import (
    QuantPlan,
    _moe,
    fake_quantize_params,
    make_quant_forward,
)
from mxmoe_jax.quant.gptq import gptq_quantize
from mxmoe_jax.quant.qtensor import dequantize
from mxmoe_jax.quant.rtn import fake_quant_weight
from tests.conftest import FIXTURES
from tests.quant.helpers import load_hf_flat

CYCLE = ["w4a4_g-1_sym", "w8a8_g-1_sym", None, "w8a8_g-1_fp8", "w4a4_g16_sym", "w4a16_g16_asym"]


def _np_act(x: np.ndarray, name: str | None) -> np.ndarray:
    """Independent per-token (per K-group) symmetric fake-quant."""
    if name is None or "a16" in name:
        return x
    if name.endswith("fp8"):
        s = np.abs(x).max(-1, keepdims=True) / 448
        s[s == 0] = 1
        return (x / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s
    bits = int(name.split("a")[1].split("_")[0])
    g = int(name.split("_g")[1].split("_")[0])
    g = x.shape[-1] if g == -1 else g
    xg = x.reshape(-1, x.shape[-1] // g, g)
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(xg).max(-1, keepdims=True) / qmax
    s[s == 0] = 1
    return (np.clip(np.round(xg / s), -qmax, qmax) * s).reshape(x.shape)


def _silu(v):
    return v / (1 + np.exp(-v))


def _mixed_plan(cfg, layer):
    m = {}
    for e in range(cfg.num_experts + 1):
        for j, b in enumerate(("gate", "up", "down")):
            name = CYCLE[(e + j) % len(CYCLE)]
            if name is not None:
                m[(layer, e, b)] = name
    return QuantPlan.from_mapping(m)


def test_moe_block_matches_per_token_loop():
    from mxmoe_jax.models import forward_hidden, from_flat_params
    from mxmoe_jax.models.moe import route

    d = FIXTURES / "hf" / "qwen2_moe_norm"
    cfg, flat = load_hf_flat(d)
    layer = 1
    plan = _mixed_plan(cfg, layer)
    qflat = fake_quantize_params(cfg, flat, plan)
    model = from_flat_params(cfg, qflat)
    ids = jnp.asarray(np.load(d / "inputs.npz")["input_ids"])
    _, cap = forward_hidden(model, ids, capture=[layer], with_logits=False)
    y = cap[layer]  # [B, T, D]
    block = model.layers[layer].mlp
    from flax import nnx

    moe = nnx.jit(functools.partial(_moe, layer=layer, plan=plan.as_dict(), rotation=None))
    got = np.asarray(moe(block, y)).reshape(-1, cfg.hidden_size)

    x = np.asarray(y, np.float64).reshape(-1, cfg.hidden_size)
    idx, weight = (np.asarray(a) for a in route(block.router_logits(jnp.asarray(y).reshape(
        -1, cfg.hidden_size)), cfg))
    p = f"layers/{layer}/mlp"
    gate, up, down = (np.asarray(qflat[f"{p}/experts/{b}"], np.float64)
                      for b in ("gate", "up", "down"))
    sch = plan.as_dict()

    def expert(v, e, wg, wu, wd):
        def s(b):
            return None if (layer, e, b) not in sch else sch[(layer, e, b)].name
        h = _silu(_np_act(v, s("gate")) @ wg) * (_np_act(v, s("up")) @ wu)
        return _np_act(h, s("down")) @ wd

    want = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            want[t] += weight[t, j] * expert(x[t:t + 1], e, gate[e], up[e], down[e])[0]
    sh = [np.asarray(qflat[f"{p}/shared/{b}_proj/kernel"], np.float64)
          for b in ("gate", "up", "down")]
    g = 1 / (1 + np.exp(-(x @ np.asarray(qflat[f"{p}/shared_gate/kernel"], np.float64))))
    want += g * expert(x, cfg.num_experts, *sh)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # and the quantization did something: the FP block differs
    fp_model = from_flat_params(cfg, flat)
    fp = np.asarray(nnx.jit(lambda m, v: m(v))(fp_model.layers[layer].mlp, y))
    assert np.abs(fp.reshape(want.shape) - want).max() > 1e-3 * np.abs(want).max()


def test_fake_quantize_params_replaces_exactly_the_planned_blocks():
    cfg, flat = load_hf_flat(FIXTURES / "hf" / "deepseek_v2_lite")
    dense = next(i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i))
    moe = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    w = flat[f"layers/{moe}/mlp/experts/up"][2]
    h = np.eye(w.shape[0], dtype=np.float32) + 0.5
    gq = gptq_quantize(w, h, "w3a16_g-1_asym")
    plan = QuantPlan.from_mapping({(moe, 2, "up"): "w3a16_g-1_asym",
                                   (moe, cfg.num_experts, "down"): "w4a16_g-1_sym",
                                   (dense, 0, "gate"): "w8a16_g-1_asym"})
    out = fake_quantize_params(cfg, flat, plan, quantized={(moe, 2, "up"): gq})
    changed = {k for k in flat if not np.array_equal(out[k], flat[k])}
    assert changed == {f"layers/{moe}/mlp/experts/up", f"layers/{moe}/mlp/shared/down_proj/kernel",
                       f"layers/{dense}/mlp/gate_proj/kernel"}
    key = f"layers/{moe}/mlp/experts/up"
    np.testing.assert_array_equal(out[key][2], np.asarray(dequantize(gq)))
    np.testing.assert_array_equal(np.delete(out[key], 2, 0), np.delete(flat[key], 2, 0))
    key = f"layers/{moe}/mlp/shared/down_proj/kernel"
    want = np.asarray(fake_quant_weight(flat[key], "w4a16_g-1_sym"))
    np.testing.assert_array_equal(out[key], want)
    with pytest.raises(ValueError, match="expert"):
        fake_quantize_params(cfg, flat, QuantPlan.from_mapping({(moe, 99, "up"): "w4a16_g-1_sym"}))
    with pytest.raises(ValueError, match="scheme"):
        fake_quantize_params(cfg, flat, plan, quantized={(moe, 2, "up"): gptq_quantize(
            w, h, "w4a16_g-1_asym")})
    with pytest.raises(ValueError, match="block"):
        QuantPlan.from_mapping({(moe, 0, "o_proj"): "w4a16_g-1_sym"})


def test_uniform_plan_forward_runs_and_differs():
    from mxmoe_jax.models import forward, from_flat_params

    d = FIXTURES / "hf" / "qwen2_moe_sparse_step"
    cfg, flat = load_hf_flat(d)
    ids = jnp.asarray(np.load(d / "inputs.npz")["input_ids"])
    plan = QuantPlan.uniform(cfg, "w4a4_g-1_sym", dense=True)
    keys = {k for k, _ in plan.items}
    assert all(cfg.is_moe_layer(layer) or e == 0 for layer, e, _ in keys)
    assert any(e == cfg.num_experts for _, e, _ in keys)  # the shared expert is in
    model = from_flat_params(cfg, fake_quantize_params(cfg, flat, plan))
    got = np.asarray(make_quant_forward(plan)(model, ids))
    ref = np.asarray(forward(from_flat_params(cfg, flat), ids))
    assert np.all(np.isfinite(got))
    assert 1e-3 < np.abs(got - ref).max() < 0.5 * np.abs(ref).max()
