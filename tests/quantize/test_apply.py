"""Quantized models (``quantize_model``): per-(layer, expert, block) schemes against a per-token
NumPy loop, exactly the allocated stacks replaced, and a uniform allocation's forward."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from mxmoe_jax.alloc.qconfig import Allocation
from mxmoe_jax.models import (
    forward,
    forward_hidden,
    from_flat_params,
    swiglu_stacks,
    to_flat_params,
)
from mxmoe_jax.models.moe import QuantizedExperts, route
from mxmoe_jax.ops import dequantize_weight
from mxmoe_jax.quant.gptq import gptq_quantize
from mxmoe_jax.quant.qtensor import dequantize
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import W16A16, QScheme
from mxmoe_jax.quantize.apply import quantize_model, rtn_weights
from tests.conftest import FIXTURES
from tests.quant.helpers import load_hf_flat

CYCLE = ["w4a4_g-1_sym", "w8a8_g-1_sym", None, "w8a8_g-1_fp8", "w4a4_g16_sym", "w4a16_g16_asym"]
BLOCK_SHIFT = (0, 0, 1)  # gate and up of an expert share a scheme (they run as one GEMM)


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


def _np_weight(w: np.ndarray, name: str | None) -> np.ndarray:
    """One block's weights fake-quantized on their own (RTN; None: FP as they are)."""
    if name is None:
        return np.asarray(w, np.float64)
    return np.asarray(fake_quant_weight(jnp.asarray(w, jnp.float32), name), np.float64)


def _silu(v):
    return v / (1 + np.exp(-v))


def _mixed_mapping(cfg, layer):
    m = {}
    for e in range(cfg.num_experts + 1):
        for j, b in enumerate(("gate", "up", "down")):
            name = CYCLE[(e + BLOCK_SHIFT[j]) % len(CYCLE)]
            if name is not None:
                m[(layer, e, b)] = name
    return m


def test_moe_block_matches_per_token_loop():
    d = FIXTURES / "hf" / "qwen2_moe_norm"
    cfg, flat = load_hf_flat(d)
    layer = 1
    sch = _mixed_mapping(cfg, layer)
    model = from_flat_params(cfg, flat)
    qmodel = quantize_model(model, Allocation(cfg, sch))
    ids = jnp.asarray(np.load(d / "inputs.npz")["input_ids"])
    _, cap = forward_hidden(qmodel, ids, capture=[layer], with_logits=False)
    y = cap[layer]  # [B, T, D]
    block = qmodel.layers[layer].mlp
    got = np.asarray(nnx.jit(lambda b, v: b(v))(block, y)).reshape(-1, cfg.hidden_size)

    x = np.asarray(y, np.float64).reshape(-1, cfg.hidden_size)
    idx, weight = (np.asarray(a) for a in route(block.router_logits(jnp.asarray(y).reshape(
        -1, cfg.hidden_size)), cfg))
    p = f"layers/{layer}/mlp"
    gate, up, down = (flat[f"{p}/experts/{b}"] for b in ("gate", "up", "down"))

    def s(e, b):
        return sch.get((layer, e, b))

    def weights(e, wg, wu, wd):  # each block fake-quantized on its own, from the FP weights
        return tuple(_np_weight(w, s(e, b)) for w, b in ((wg, "gate"), (wu, "up"), (wd, "down")))

    def expert(v, e, wg, wu, wd):
        h = _silu(_np_act(v, s(e, "gate")) @ wg) * (_np_act(v, s(e, "up")) @ wu)
        return _np_act(h, s(e, "down")) @ wd

    routed = {e: weights(e, gate[e], up[e], down[e]) for e in range(cfg.num_experts)}
    want = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            want[t] += weight[t, j] * expert(x[t:t + 1], e, *routed[e])[0]
    sh = [flat[f"{p}/shared/{b}_proj/kernel"] for b in ("gate", "up", "down")]
    g = 1 / (1 + np.exp(-(x @ np.asarray(flat[f"{p}/shared_gate/kernel"], np.float64))))
    want += g * expert(x, cfg.num_experts, *weights(cfg.num_experts, *sh))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # and the quantization did something: the FP block differs
    fp = np.asarray(nnx.jit(lambda m, v: m(v))(model.layers[layer].mlp, y))
    assert np.abs(fp.reshape(want.shape) - want).max() > 1e-3 * np.abs(want).max()


def _fused(gate, up):
    return np.concatenate([np.asarray(gate), np.asarray(up)], axis=-1)


def test_quantize_model_replaces_exactly_the_allocated_stacks():
    cfg, flat = load_hf_flat(FIXTURES / "hf" / "deepseek_v2_lite")
    dense = next(i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i))
    moe = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    e_sh = cfg.num_experts
    model = from_flat_params(cfg, flat)
    p = f"layers/{moe}/mlp"
    w = _fused(flat[f"{p}/experts/gate"][2], flat[f"{p}/experts/up"][2])  # [D, 2I]
    h = np.eye(w.shape[0], dtype=np.float32) + 0.5
    gq = gptq_quantize(w, h, "w3a16_g-1_asym")
    alloc = Allocation(cfg, {(moe, 2, "gate"): "w3a16_g-1_asym", (moe, 2, "up"): "w3a16_g-1_asym",
                             (moe, e_sh, "down"): "w4a16_g-1_sym",
                             (dense, 0, "gate"): "w8a16_g-1_asym",
                             (dense, 0, "up"): "w8a16_g-1_asym"})
    q = rtn_weights(model, alloc)
    assert set(q) == {(moe, 2, "gate_up"), (moe, e_sh, "down"), (dense, 0, "gate_up")}
    q[(moe, 2, "gate_up")] = gq
    out = quantize_model(model, alloc, quantized=q)

    quantized = {(moe, None), (moe, e_sh), (dense, 0)}
    for (li, idx, src), (lo, ido, dst) in zip(swiglu_stacks(model), swiglu_stacks(out),
                                              strict=True):
        assert (li, idx) == (lo, ido)
        assert isinstance(dst, QuantizedExperts) == ((li, idx) in quantized), (li, idx)
        if (li, idx) not in quantized:
            assert type(dst) is type(src)
    # every parameter outside the quantized stacks is as it was (and the input is untouched)
    stack_keys = {f"{p}/experts/{b}" for b in ("gate", "up", "down")} | {
        f"{p}/shared/{b}_proj/kernel" for b in ("gate", "up", "down")} | {
        f"layers/{dense}/mlp/{b}_proj/kernel" for b in ("gate", "up", "down")}
    out_flat = to_flat_params(out)
    assert set(out_flat) == set(flat) - stack_keys
    for k, v in out_flat.items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)
    for k, v in to_flat_params(model).items():
        np.testing.assert_array_equal(v, flat[k], err_msg=k)

    def check(stack, fp: dict, want: dict):
        """fp: proj -> FP [E, K, N]; want: (proj, expert) -> dequantized values of an allocated
        expert; every other expert keeps its FP values in a w16a16 group."""
        ew = stack.weights()
        seen = set()
        for proj in ("gate_up", "down"):
            for grp in getattr(ew, proj):
                vals = np.asarray(dequantize_weight(grp.w))
                for i, e in enumerate(grp.experts):
                    seen.add((proj, e))
                    if (proj, e) in want:
                        assert grp.scheme != W16A16
                        np.testing.assert_array_equal(vals[i], want[(proj, e)])
                    else:
                        assert grp.scheme == W16A16 and not isinstance(grp.w, tuple)
                        np.testing.assert_array_equal(vals[i], fp[proj][e])
        assert seen == {(proj, e) for proj in ("gate_up", "down") for e in range(ew.num_experts)}

    check(out.layers[moe].mlp.experts,
          {"gate_up": _fused(flat[f"{p}/experts/gate"], flat[f"{p}/experts/up"]),
           "down": flat[f"{p}/experts/down"]},
          {("gate_up", 2): np.asarray(dequantize(gq))})
    sk = {b: flat[f"{p}/shared/{b}_proj/kernel"] for b in ("gate", "up", "down")}
    check(out.layers[moe].mlp.shared,
          {"gate_up": _fused(sk["gate"], sk["up"])[None], "down": sk["down"][None]},
          {("down", 0): np.asarray(fake_quant_weight(sk["down"], "w4a16_g-1_sym"))})
    dk = {b: flat[f"layers/{dense}/mlp/{b}_proj/kernel"] for b in ("gate", "up", "down")}
    check(out.layers[dense].mlp,
          {"gate_up": _fused(dk["gate"], dk["up"])[None], "down": dk["down"][None]},
          {("gate_up", 0): _fused(fake_quant_weight(dk["gate"], "w8a16_g-1_asym"),
                                  fake_quant_weight(dk["up"], "w8a16_g-1_asym"))})

    with pytest.raises(ValueError, match="expert"):
        quantize_model(model, Allocation(cfg, {(moe, 99, b): "w4a16_g-1_sym"
                                               for b in ("gate", "up")}))
    bad = dict(q)
    bad[(moe, 2, "gate_up")] = gptq_quantize(w, h, "w4a16_g-1_asym")
    with pytest.raises(ValueError, match="scheme"):
        quantize_model(model, alloc, quantized=bad)
    with pytest.raises(ValueError, match="block"):
        Allocation(cfg, {(moe, 0, "o_proj"): "w4a16_g-1_sym"})
    with pytest.raises(ValueError, match="gate and up"):
        Allocation(cfg, {(moe, 0, "gate"): "w4a16_g-1_sym", (moe, 0, "up"): "w8a16_g-1_sym"})
    with pytest.raises(ValueError, match="gate and up"):
        Allocation(cfg, {(moe, 0, "gate"): "w4a16_g-1_sym"})
    assert cfg.intermediate_size % 64  # the dense MLP's down has K = 96: g64 becomes g48
    sub = Allocation(cfg, {(dense, 0, "down"): "w4a16_g64_sym"})
    assert sub.as_dict() == {(dense, 0, "down"): QScheme.parse("w4a16_g48_sym")}
    with pytest.raises(ValueError, match="multiple of 16"):  # an invalid scheme stays an error
        Allocation(cfg, {(dense, 0, "down"): "w4a16_g40_sym"})


@pytest.mark.parametrize("scheme, sub", [("w4a16_g32_asym", "w4a16_g16_asym"),
                                         ("w4a4_g32_sym", "w4a4_g16_sym")])
def test_group_size_not_dividing_k_quantizes_with_the_substitute(scheme, sub, capsys,
                                                                 monkeypatch):
    """qwen2_moe: the shared expert's down has K = 48, which g32 does not divide: a uniform
    allocation (``--scheme``) and a qconfig naming the scheme there quantize it with g16."""
    from mxmoe_jax.quant import scheme as scheme_mod

    monkeypatch.setattr(scheme_mod, "_NOTED", set())  # notes are once per process
    d = FIXTURES / "hf" / "qwen2_moe_norm"
    cfg, flat = load_hf_flat(d)
    assert cfg.shared_intermediate_size == 48
    alloc = Allocation.uniform(cfg, scheme)
    e_sh = cfg.num_experts
    for (layer, e, b), s in alloc.as_dict().items():
        assert s == QScheme.parse(sub if (e, b) == (e_sh, "down") else scheme), (layer, e, b)
    layers = alloc.to_layers()  # what the QMODEL's qconfig.json names: the schemes stored
    assert layers["0"][str(e_sh)]["down"] == sub and layers["0"]["0"]["down"] == scheme
    q = {"format": "mxmoe-jax/qconfig/1", "layers": {
        li: {e: {b: scheme for b in blocks} for e, blocks in experts.items()}
        for li, experts in layers.items()}}
    assert Allocation.from_qconfig(cfg, q) == alloc
    assert capsys.readouterr().err == (f"{scheme}: group size 32 does not divide shared "
                                       f"down_proj K=48; using {sub} there\n")  # once for both

    model = from_flat_params(cfg, flat)
    qmodel = quantize_model(model, alloc)
    layer = cfg.moe_layers[0]
    (grp,) = qmodel.layers[layer].mlp.shared.weights().down
    assert grp.scheme == QScheme.parse(sub)
    sk = np.asarray(flat[f"layers/{layer}/mlp/shared/down_proj/kernel"])
    np.testing.assert_array_equal(np.asarray(dequantize_weight(grp.w))[0],
                                  np.asarray(fake_quant_weight(sk, sub)))
    ids = jnp.asarray(np.load(d / "inputs.npz")["input_ids"])
    assert np.all(np.isfinite(np.asarray(forward(qmodel, ids))))


def test_uniform_allocation_forward_runs_and_differs():
    d = FIXTURES / "hf" / "qwen2_moe_sparse_step"
    cfg, flat = load_hf_flat(d)
    ids = jnp.asarray(np.load(d / "inputs.npz")["input_ids"])
    alloc = Allocation.uniform(cfg, "w4a4_g-1_sym", dense=True)
    keys = {k for k, _ in alloc.items}
    assert all(cfg.is_moe_layer(layer) or e == 0 for layer, e, _ in keys)
    assert any(e == cfg.num_experts for _, e, _ in keys)  # the shared expert is in
    model = from_flat_params(cfg, flat)
    got = np.asarray(forward(quantize_model(model, alloc), ids))
    ref = np.asarray(forward(model, ids))
    assert np.all(np.isfinite(got))
    assert 1e-3 < np.abs(got - ref).max() < 0.5 * np.abs(ref).max()
