"""Calibration pieces on small random models of several families (no ../shared needed).

References: NumPy loops for the padded expert groups, the model's own decoder layers for the
layer walk, and brute force through the model's parameters for Δ.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx

from mxmoe_jax.calib import calibrate as C
from mxmoe_jax.calib import walk
from mxmoe_jax.calib.trace import build_trace, trace_counts
from mxmoe_jax.config import BLOCKS, ModelConfig
from mxmoe_jax.models import MoECausalLM, set_rotation
from mxmoe_jax.models import moe as moe_lib
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import QScheme

RNG = np.random.default_rng(0)


def _random_model(name: str, std_scale: float = 1.0):
    cfg = ModelConfig.from_hf(json.loads((FIXTURES / "hf" / name / "config.json").read_text()))
    model = MoECausalLM(cfg, rngs=nnx.Rngs(0))
    if std_scale != 1.0:  # larger weights: routing and Δ far from fp32 noise
        for _, p in nnx.iter_graph(model):
            if isinstance(p, nnx.Param) and p[...].ndim >= 2:
                p[...] = p[...] * std_scale
    return cfg, model


@nnx.jit
def _run_layer(layer, x):
    """The model's own decoder layer, jitted."""
    return layer(x, jnp.arange(x.shape[1]))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 100, 1000, 4097])
def test_capacity_for_bounds(n):
    c = moe_lib.capacity_for(n)
    assert c >= n and c >= 8
    assert c <= max(8, 1.25 * n)


def test_pad_groups_against_numpy():
    t, k, e, d = 37, 3, 5, 4
    x = RNG.normal(size=(t, d)).astype(np.float32)
    idx = np.stack([RNG.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    w = RNG.random((t, k)).astype(np.float32)
    cap = int(np.bincount(idx.ravel(), minlength=e).max())
    g = moe_lib.pad_groups(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), e, cap + 3)
    for ex in range(e):
        tok, slot = np.nonzero(idx == ex)  # token order, as the groups promise
        n = len(tok)
        np.testing.assert_array_equal(np.asarray(g.token[ex, :n]), tok)
        np.testing.assert_array_equal(np.asarray(g.x[ex, :n]), x[tok])
        np.testing.assert_array_equal(np.asarray(g.weight[ex, :n]), w[tok, slot])
        assert np.all(np.asarray(g.valid[ex, :n])) and not np.any(np.asarray(g.valid[ex, n:]))
        assert np.all(np.asarray(g.weight[ex, n:]) == 0) and np.all(np.asarray(g.x[ex, n:]) == 0)


@pytest.mark.parametrize("name", [
    "qwen2_moe_norm", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2_lite"])
def test_layer_walk_matches_model(name):
    cfg, model = _random_model(name)
    ids = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 16)))
    x = model.embed_tokens(ids)
    for layer in model.layers:
        want = _run_layer(layer, x)
        got = walk.run_layer(layer, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        x = want


def test_deepseek_v2_shortcut_equals_brute_force_and_trace():
    """DS2: dense first layer, ungated shared experts, scaled group-limited routing."""
    cfg, model = _random_model("deepseek_v2_lite", std_scale=25.0)
    ids = RNG.integers(0, cfg.vocab_size, (2, 24))
    scheme = QScheme.parse("w4a16_g-1_sym")
    res = C.calibrate(model, ids, C.CalibConfig(schemes=(scheme.name,), batch_tokens=32),
                      meta={})
    assert list(res["losses"][scheme.name]) == [str(i) for i in cfg.moe_layers]
    i = cfg.moe_layers[-1]
    layer = model.layers[i]
    x = model.embed_tokens(jnp.asarray(ids))
    for lay in model.layers[:i]:
        x = _run_layer(lay, x)
    ref = np.asarray(_run_layer(layer, x), np.float64)
    got = res["losses"][scheme.name][str(i)]
    assert len(got) == cfg.num_experts + 1  # shared experts last
    for e in (0, 3, cfg.num_experts):
        for bi, b in enumerate(("gate", "up", "down")):
            param = getattr(layer.mlp.experts, b) if e < cfg.num_experts \
                else getattr(layer.mlp.shared, f"{b}_proj").kernel
            orig = param[...]
            param[...] = orig.at[e].set(fake_quant_weight(orig[e], scheme)) \
                if e < cfg.num_experts else fake_quant_weight(orig, scheme)
            try:
                want = float(np.linalg.norm(np.asarray(_run_layer(layer, x), np.float64) - ref))
            finally:
                param[...] = orig
            assert abs(want - got[str(e)][bi]) <= 1e-3 * want + 1e-7, (e, b, want)
    counts, wsums = trace_counts(model, ids)
    tr = build_trace(cfg, counts, wsums, model="ds2", text=[], num_tokens=24)
    assert tr["moe_layers"] == list(cfg.moe_layers) and "layer-0" not in tr
    assert tr["num_shared_experts"] == cfg.shared_intermediate_size / cfg.moe_intermediate_size
    per_window = 24 * cfg.num_experts_per_tok
    assert counts.sum(axis=2).tolist() == [[per_window] * 2] * len(tr["moe_layers"])


def test_group_size_larger_than_k_is_per_channel_and_bad_config_errors(capsys, monkeypatch):
    from mxmoe_jax.quant import scheme as scheme_mod

    monkeypatch.setattr(scheme_mod, "_NOTED", set())  # notes are once per process
    cfg, model = _random_model("mixtral")  # K = 64 (gate/up) and 32 (down)
    schemes = ("w4a16_g64_asym", "w4a16_g-1_asym")
    res = C.calibrate(model, RNG.integers(0, cfg.vocab_size, (1, 16)),
                      C.CalibConfig(schemes=schemes, layers=(0,)), meta={})
    blocks, per_channel = (res["losses"][s]["0"] for s in schemes)
    assert len(blocks) == cfg.num_experts  # no shared expert
    # down (K = 32 < 64) is measured per channel: one group of 32 is exactly that
    for e, v in blocks.items():
        assert None not in v
        assert v[2] == pytest.approx(per_channel[e][2], rel=1e-6, abs=1e-9)
    assert res["meta"]["group_size_substitutions"] == [
        {"scheme": "w4a16_g64_asym", "k": 32, "blocks": ["down_proj"], "used": "w4a16_g-1_asym"}]
    assert "w4a16_g64_asym: group size 64 does not divide down_proj K=32; using " \
        "w4a16_g-1_asym there" in capsys.readouterr().err
    with pytest.raises(ValueError, match="method"):
        C.CalibConfig(schemes=("w4a16_g-1_asym",), method="awq")
    with pytest.raises(ValueError, match="scheme"):
        C.CalibConfig(schemes=("w5a16_g-1_asym",))
    with pytest.raises(ValueError, match="layers"):
        C.calibrate(model, np.zeros((1, 8), np.int32),
                    C.CalibConfig(schemes=("w8a8_g-1_sym",), layers=(7,)), meta={})


@pytest.mark.parametrize("metric", ["layer_out_norm", "model_out_norm"])
def test_substituted_group_size_is_measured_under_the_requested_name(metric):
    """qwen2_moe: gate/up K = 64, routed down K = 32, shared down K = 48, which g32 does not
    divide: its shared down is measured as g16 (weights and, for w4a4, the down input), the other
    blocks as g32; the shared down is checked by brute force through the model's parameters."""
    cfg, model = _random_model("qwen2_moe_norm", std_scale=25.0)
    assert cfg.shared_intermediate_size == 48
    ids = RNG.integers(0, cfg.vocab_size, (2, 16))
    schemes = ("w4a16_g32_asym", "w4a16_g16_asym", "w4a4_g32_sym", "w4a4_g16_sym")
    res = C.calibrate(model, ids, C.CalibConfig(schemes=schemes, layers=(1,), metric=metric,
                                                batch_tokens=16), meta={})
    assert [(d["scheme"], d["k"], d["blocks"], d["used"])
            for d in res["meta"]["group_size_substitutions"]] == [
        ("w4a16_g32_asym", 48, ["shared down_proj"], "w4a16_g16_asym"),
        ("w4a4_g32_sym", 48, ["shared down_proj"], "w4a4_g16_sym")]
    shared = str(cfg.num_experts)
    for g32, g16 in (schemes[:2], schemes[2:]):
        got, sub = res["losses"][g32]["1"], res["losses"][g16]["1"]
        assert all(None not in v for v in got.values())
        assert got[shared][2] == pytest.approx(sub[shared][2], rel=1e-5)
        assert got[shared][0] != pytest.approx(sub[shared][0], rel=1e-3)  # gate stays g32
    # brute force: the shared down_proj quantized with g16 in the model's parameters
    layer = model.layers[1]
    x = _run_layer(model.layers[0], model.embed_tokens(jnp.asarray(ids)))

    def output(x):  # what the metric compares (layer 1 is the last layer)
        out = _run_layer(layer, x)
        out = walk.final_hidden(model, out) if metric == "model_out_norm" else out
        return np.asarray(out, np.float64)

    ref = output(x)
    param = layer.mlp.shared.down_proj.kernel
    orig = param[...]
    param[...] = fake_quant_weight(orig, "w4a16_g16_asym")
    try:
        want = float(np.linalg.norm(output(x) - ref))
    finally:
        param[...] = orig
    got = res["losses"]["w4a16_g32_asym"]["1"][shared][2]
    assert abs(want - got) <= 1e-3 * want + 1e-7, (want, got)


# ------------------------------------------------------------------------------ --hadamard

def _eval_rotation(cfg, model, seed):
    """The rotated model and Rotation exactly as ``eval --hadamard`` builds them."""
    from mxmoe_jax.models import to_flat_params
    from mxmoe_jax.quant.rotation import rotate_params

    return rotate_params(cfg, to_flat_params(model), seed=seed, online_down=True)


@pytest.fixture(scope="module")
def ds2_scaled():
    """DS2 (dense first layer, ungated shared experts): every down_proj width rotated online
    (96, 32, 64); larger weights keep Δ far from fp32 noise. Shared: model init is seconds."""
    return _random_model("deepseek_v2_lite", std_scale=25.0)


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def _layer_output_probe(cfg, model):
    """Make ``model.logits(x)[..., :D]`` return ``x`` itself (the last decoder layer's output):
    identity final norm, LM head ``[I | 0]``. Needs V >= D."""
    d, v = cfg.hidden_size, cfg.vocab_size
    assert v >= d and not cfg.tie_word_embeddings
    model.final_norm = _Identity()
    model.lm_head.kernel[...] = jnp.eye(d, v, dtype=model.lm_head.kernel[...].dtype)
    return model


def test_hadamard_walk_matches_eval_rotation(ds2_scaled):
    """The calibration walk under --hadamard (dense layer, shared and routed experts, all with the
    online down_proj rotation) computes the rotated model's forward (``set_rotation``), as eval
    does, and the rotation preserves the function of the unrotated model."""
    from mxmoe_jax.models import from_flat_params

    cfg, model = ds2_scaled
    ids = jnp.asarray(RNG.integers(0, cfg.vocab_size, (2, 16)))
    cfg_r, flat_r, rot_eval = _eval_rotation(cfg, model, seed=5)
    assert rot_eval.online_down and len(rot_eval.down) == 3  # dense 96, routed 32, shared 64
    want = np.asarray(set_rotation(from_flat_params(cfg_r, flat_r), rot_eval)(ids))
    np.testing.assert_allclose(want, np.asarray(model(ids)), rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())

    rmodel, rot = C.rotate_for_calibration(model, seed=5)
    for width, s in rot_eval.down.items():
        np.testing.assert_array_equal(rot.down_signs(width), s)
    x = walk.embed(rmodel, ids)
    for layer in rmodel.layers:
        x = walk.run_layer(layer, x)
    got = np.asarray(rmodel.logits(x))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the online part matters: without it the rotated weights compute something else
    set_rotation(rmodel, None)
    y = walk.embed(rmodel, ids)
    for layer in rmodel.layers:
        y = walk.run_layer(layer, y)
    assert np.abs(np.asarray(rmodel.logits(y)) - want).max() > 1e-2 * np.abs(want).max()


def test_hadamard_shortcut_equals_quant_forward(ds2_scaled):
    """Shortcut Δ under --hadamard against brute force with the eval forward: one block
    quantized (weight-only: RTN of that block in the params; weight-activation: a one-entry
    Allocation through ``quantize_model``, activation quant on the rotated down input), the
    rotated model's forward (``set_rotation``), the last layer's output.
    An RTN weight-only scheme and a weight-activation one."""
    from mxmoe_jax.alloc.qconfig import Allocation
    from mxmoe_jax.models import from_flat_params
    from mxmoe_jax.quantize.apply import quantize_model

    cfg, model = ds2_scaled
    ids = RNG.integers(0, cfg.vocab_size, (2, 24))
    schemes = [QScheme.parse(s) for s in ("w4a16_g-1_sym", "w8a8_g-1_sym")]
    i = cfg.num_layers - 1  # the last layer: its output is the probe's logits
    assert cfg.is_moe_layer(i)
    rmodel, rot = C.rotate_for_calibration(model, seed=1)
    config = C.CalibConfig(schemes=tuple(s.name for s in schemes), hadamard=True, layers=(i,),
                           batch_tokens=32)  # 48 tokens: two chunks accumulate
    res = C.calibrate(rmodel, ids, config, meta={}, rotation=rot)
    assert res["meta"]["online_down"] and res["meta"]["rotation_seed"] == 1

    cfg_r, flat_r, rot_eval = _eval_rotation(cfg, model, seed=1)
    d = cfg.hidden_size

    def rotated(flat):
        return set_rotation(from_flat_params(cfg_r, flat), rot_eval)

    def layer_out(m):
        m = _layer_output_probe(cfg_r, m)
        return np.asarray(m(jnp.asarray(ids)), np.float64)[..., :d]

    def one_block(e, b, scheme):
        """The rotated model with block ``b`` of expert ``e`` quantized, as the docstring says."""
        if not scheme.weight_only:
            return quantize_model(rotated(flat_r), Allocation(cfg_r, {(i, e, b): scheme}))
        flat = dict(flat_r)
        if e < cfg.num_experts:
            key = f"layers/{i}/mlp/experts/{b}"
            w = np.array(flat[key])
            w[e] = np.asarray(fake_quant_weight(w[e], scheme))
        else:
            key = f"layers/{i}/mlp/shared/{b}_proj/kernel"
            w = np.asarray(fake_quant_weight(flat[key], scheme))
        flat[key] = w
        return rotated(flat)

    ref = layer_out(rotated(flat_r))
    cases = {schemes[0]: [(3, "down"), (cfg.num_experts, "up")],
             schemes[1]: [(5, "down"), (cfg.num_experts, "down")]}
    for scheme, blocks in cases.items():
        got = res["losses"][scheme.name][str(i)]
        for e, b in blocks:
            want = float(np.linalg.norm(layer_out(one_block(e, b, scheme)) - ref))
            d_got = got[str(e)][BLOCKS.index(b)]
            assert want > 0 and abs(want - d_got) <= 1e-3 * want + 1e-6, (scheme, e, b, want)


def test_hadamard_without_rotation_is_an_error():
    cfg, model = _random_model("mixtral")
    with pytest.raises(ValueError, match="rotation"):
        C.calibrate(model, np.zeros((1, 8), np.int32),
                    C.CalibConfig(schemes=("w8a8_g-1_sym",), hadamard=True), meta={})
