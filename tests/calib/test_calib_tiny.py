"""Calibration and tracing on the tiny trained model (``../shared/models/qwen2moe-tiny-books``).

The shortcut Δ (all experts at once) is checked against brute force: quantize one block in the
model's parameters (or, for weight-activation schemes, in a per-expert float64 reference of the
MoE block), rerun the decoder layer and take the norm of the layer-output difference. Few tokens
(2 windows of 64) keep the CPU time small.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BOOKS_CALIB, require_shared
from flax import nnx

from mxmoe_jax.calib import calibrate as C
from mxmoe_jax.calib import trace as T
from mxmoe_jax.models import forward_hidden, route
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import QScheme
from tests.quant.test_act import spec_quantize

LAYERS = (1, 4)  # the two layers checked block by block
SHORTCUT_BATCH = 64  # the shortcut fixture's tokens per chunk (one window: chunks accumulate)
BLOCKS = ("gate", "up", "down")
HI = jax.lax.Precision.HIGHEST


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    """The tiny model converted to a MODEL_DIR (fp32), once per session (tests/conftest.py)."""
    return tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from mxmoe_jax.models.io import load_model_dir

    return load_model_dir(tiny_dir, dtype=jnp.float32)


@pytest.fixture(scope="module")
def windows(tiny_dir):
    from mxmoe_jax.data import load_tokenizer, token_windows, tokenize_texts

    require_shared(BOOKS_CALIB)
    ids = tokenize_texts(load_tokenizer(tiny_dir), [BOOKS_CALIB])
    return np.asarray(token_windows(ids, seqlen=64, nsamples=2, seed=0))


def _layer_inputs(model, windows, i):
    """FP input of decoder layer ``i`` through the model's own layers, ``[B, T, D]``."""

    @nnx.jit
    def run(m, ids):
        x = m.embed_tokens(ids)
        pos = jnp.arange(ids.shape[1])
        for layer in m.layers[:i]:
            x = layer(x, pos)
        return x

    return run(model, jnp.asarray(windows))


def _rel_close(brute: float, shortcut: float, rtol: float = 1e-4) -> bool:
    return abs(brute - shortcut) <= rtol * max(brute, shortcut) + 1e-9


# ------------------------------------------------------------------------------ exactness

def _brute_force_params(model, windows, layer_idx, scheme):
    """Δ[e][b] by quantizing one block in the model's params and rerunning the whole layer."""
    cfg = model.cfg
    layer = model.layers[layer_idx]
    x = _layer_inputs(model, windows, layer_idx)
    pos = jnp.arange(windows.shape[1])
    run = nnx.jit(lambda lay, x: lay(x, pos))
    ref = np.asarray(run(layer, x), np.float64)
    out = {}
    # RTN is per expert: quantizing the stack once and taking expert e's slice is the same; each
    # block with the scheme calibrate uses for its K (g128 on the routed down's K = 192: g96)
    def fq(w):
        return fake_quant_weight(w, scheme.for_k(w.shape[-2]))

    stacks = {b: fq(getattr(layer.mlp.experts, b)[...]) for b in BLOCKS}
    for e in range(cfg.num_experts + 1):
        for b in BLOCKS:
            if e < cfg.num_experts:
                param = getattr(layer.mlp.experts, b)
                orig = param[...]
                param[...] = orig.at[e].set(stacks[b][e])
            else:
                param = getattr(layer.mlp.shared, f"{b}_proj").kernel
                orig = param[...]
                param[...] = fq(orig)
            try:
                out[e, b] = float(np.linalg.norm(np.asarray(run(layer, x), np.float64) - ref))
            finally:
                param[...] = orig
    return out


def _np_fake_quant_act(x, scheme):
    """Per-token symmetric fake quantization in float32 NumPy (g-1 schemes only): the codes of
    `quant.act`'s definition, transcribed in tests/quant/test_act.py."""
    codes, scale = spec_quantize(np.asarray(x, np.float32), scheme)
    return (codes.astype(np.float32) * scale).astype(np.float32)


def _reference_layer(model, xn, layer_idx):
    """A per-expert reference of decoder layer ``layer_idx``, outputs assembled in float64.

    Returns ``out(e, b, wq, scheme)`` = the MoE-block output with block ``b`` of expert ``e``
    replaced by ``wq`` and that block's input fake-quantized (``e = None``: FP).
    """
    cfg = model.cfg
    layer = model.layers[layer_idx]
    # ``xn``: the MoE-block input [T, D] calibrate measured on (its ``moe_inputs``): the same
    # input recomputed by another program can differ in the last place on the GPU (GEMMs of
    # other shapes round differently), and a one-ulp change moves an 8- or 4-bit activation code
    # at a near-tie (a 1e-3 change of Δ). Attention and the residual are the same for every
    # block, so they cancel exactly in Ô − O and are left out.
    xn = jnp.asarray(xn)
    idx, wt = route(layer.mlp.router_logits(xn), cfg)
    idx, wt = np.asarray(idx), np.asarray(wt, np.float64)
    mlp = layer.mlp
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    experts = [{b: f32(getattr(mlp.experts, b)[...][e]) for b in BLOCKS}
               for e in range(cfg.num_experts)]
    shared = {b: f32(getattr(mlp.shared, f"{b}_proj").kernel[...]) for b in BLOCKS}
    xn = f32(xn)
    gate = 1 / (1 + np.exp(-(xn.astype(np.float64) @ f32(mlp.shared_gate.kernel[...]))))

    def expert_out(w, rows, b=None, wq=None, scheme=None):
        """One expert on its rows in f32 (NumPy matmuls), block ``b`` quantized."""
        xr = xn[rows]

        def mm(name, a):
            if name == b:
                return _np_fake_quant_act(a, scheme) @ f32(wq)
            return a @ w[name]

        g = mm("gate", xr)
        hid = (g / (1 + np.exp(-g))) * mm("up", xr)
        return mm("down", hid).astype(np.float64)

    base_routed = []
    for e in range(cfg.num_experts):
        tok, slot = np.nonzero(idx == e)
        base_routed.append((tok, slot, expert_out(experts[e], tok)))
    base_shared = expert_out(shared, np.arange(xn.shape[0]))

    def out(e=None, b=None, wq=None, scheme=None):
        total = np.zeros(xn.shape, np.float64)
        for ex, (tok, slot, y) in enumerate(base_routed):
            if ex == e:
                y = expert_out(experts[ex], tok, b, wq, scheme)
            np.add.at(total, tok, wt[tok, slot][:, None] * y)
        ys = base_shared
        if e == cfg.num_experts:
            ys = expert_out(shared, np.arange(xn.shape[0]), b, wq, scheme)
        return total + gate * ys

    return out, experts, shared


@pytest.fixture(scope="module")
def shortcut_run(tiny, windows):
    """The shortcut's loss.json for the two layers (64-token chunks, so chunks accumulate) and
    the MoE-block inputs it measured on (``calibrate(moe_inputs=...)``)."""
    _, model = tiny
    config = C.CalibConfig(schemes=("w4a16_g128_asym", "w4a16_g-1_asym", "w8a8_g-1_sym",
                                    "w4a4_g-1_sym"), layers=LAYERS, batch_tokens=SHORTCUT_BATCH)
    inputs = {}
    return C.calibrate(model, windows, config, meta={"model": "tiny"}, moe_inputs=inputs), inputs


@pytest.fixture(scope="module")
def shortcut(shortcut_run):
    return shortcut_run[0]


@pytest.mark.parametrize("scheme", ["w4a16_g128_asym", "w4a16_g-1_asym"])
def test_shortcut_equals_brute_force_rtn(tiny, windows, shortcut, scheme):
    _, model = tiny
    scheme = QScheme.parse(scheme)
    for i in LAYERS:
        brute = _brute_force_params(model, windows, i, scheme)
        got = shortcut["losses"][scheme.name][str(i)]
        assert len(got) == model.cfg.num_experts + 1
        for (e, b), want in brute.items():
            d = got[str(e)][BLOCKS.index(b)]
            assert _rel_close(want, d), (i, e, b, want, d)
        # every block is measured (g128 as g96 where K = 192), none is null
        assert len(brute) == 3 * (model.cfg.num_experts + 1)
        assert not any(v is None for blocks in got.values() for v in blocks)
    if scheme.group_size == 128:
        assert shortcut["meta"]["group_size_substitutions"] == [
            {"scheme": "w4a16_g128_asym", "k": 192, "blocks": ["down_proj"],
             "used": "w4a16_g96_asym"}]


@pytest.mark.parametrize("scheme", ["w8a8_g-1_sym", "w4a4_g-1_sym"])
def test_shortcut_equals_brute_force_weight_activation(tiny, windows, shortcut_run, scheme):
    cfg, model = tiny
    shortcut, inputs = shortcut_run
    assert sorted(inputs) == list(LAYERS)
    assert all(x.shape == (windows.size, cfg.hidden_size) for x in inputs.values())
    scheme = QScheme.parse(scheme)
    for i in LAYERS:
        out, experts, shared = _reference_layer(model, inputs[i], i)
        ref = out()
        got = shortcut["losses"][scheme.name][str(i)]
        # all experts' blocks quantized in one call each; expert e uses its own slice
        stacks = {b: np.asarray(fake_quant_weight(np.stack([x[b] for x in experts]), scheme))
                  for b in BLOCKS}
        shared_q = {b: np.asarray(fake_quant_weight(shared[b], scheme)) for b in BLOCKS}
        for e in range(cfg.num_experts + 1):
            for bi, b in enumerate(BLOCKS):
                wq = stacks[b][e] if e < cfg.num_experts else shared_q[b]
                want = float(np.linalg.norm(out(e, b, wq, scheme) - ref))
                assert _rel_close(want, got[str(e)][bi]), (i, e, b, want, got[str(e)][bi])


# ------------------------------------------------------------------------------ sanity

def test_delta_monotone_in_bits(tiny, windows):
    """Real weights: fewer bits, larger Δ, for every block of every layer (ties: unused experts)."""
    _, model = tiny
    names = ("w2a16_g64_asym", "w3a16_g64_asym", "w4a16_g64_asym", "w8a16_g64_asym")
    res = C.calibrate(model, windows, C.CalibConfig(schemes=names, batch_tokens=128),
                      meta={})
    d = np.array([[res["losses"][s][li][e] for li in res["losses"][s]
                   for e in res["losses"][s][li]] for s in names], float)  # [4, L*(E+1), 3]
    used = d[-1] > 0
    assert used.mean() > 0.5
    for lo, hi in zip(d[:-1], d[1:], strict=True):
        assert np.all(lo[used] > hi[used])
    assert np.all(d[:, ~used] == 0)


def test_gptq_beats_rtn(tiny, windows):
    _, model = tiny
    kw = dict(schemes=("w3a16_g64_asym",), layers=(2,), batch_tokens=128)
    rtn = C.calibrate(model, windows, C.CalibConfig(method="rtn", **kw), meta={})
    gptq = C.calibrate(model, windows, C.CalibConfig(method="gptq", **kw), meta={})
    a = np.array(list(rtn["losses"]["w3a16_g64_asym"]["2"].values()), float)
    b = np.array(list(gptq["losses"]["w3a16_g64_asym"]["2"].values()), float)
    used = a > 0
    assert np.all(b.mean(axis=0) < 0.8 * a.mean(axis=0))
    assert np.mean(b[used] < a[used]) > 0.9


# ------------------------------------------------------------------------------ resume

def _flat_losses(result):
    """``[((scheme, layer, expert, block), Δ)]`` of a loss.json, in order (None kept)."""
    return [((s, li, e, b), d) for s, layers in result["losses"].items()
            for li, experts in layers.items() for e, blocks in experts.items()
            for b, d in enumerate(blocks)]


def test_resume_after_interruption(tiny, windows, tmp_path):
    """A run killed during layer 3 resumes there: layers 0-2 are not recomputed, same result."""
    _, model = tiny
    config = C.CalibConfig(schemes=("w4a16_g-1_asym",), layers=(0, 2, 3), batch_tokens=128)
    partial = tmp_path / "loss.json.partial.json"
    calls = []

    def failing(w, scheme, hessian):
        calls.append(w.shape)
        if len(calls) > 12:  # 2 layers x (routed + shared) x 3 blocks done; die in the third
            raise KeyboardInterrupt
        return fake_quant_weight(w, scheme)

    with pytest.raises(KeyboardInterrupt):
        C.calibrate(model, windows, config, meta={"model": "m"}, partial_path=partial,
                    quantizer=failing)
    saved = json.loads(partial.read_text())
    assert saved["done_layers"] == [0, 2]
    calls.clear()
    resumed = C.calibrate(model, windows, config, meta={"model": "m"}, partial_path=partial,
                          quantizer=lambda w, s, h: (calls.append(w.shape),
                                                     fake_quant_weight(w, s))[1])
    assert len(calls) == 6  # only layer 3 (3 blocks of the routed stack and of the shared)
    fresh = C.calibrate(model, windows, config, meta={"model": "m"})
    # the same numbers, up to f32 summation order: on the GPU, XLA compiles the resumed run's
    # programs anew (another quantizer function) and may pick other reduction strategies
    assert {k: v for k, v in resumed.items() if k != "losses"} == \
        {k: v for k, v in fresh.items() if k != "losses"}
    a, b = _flat_losses(resumed), _flat_losses(fresh)
    assert [k for k, _ in a] == [k for k, _ in b]
    for (k, va), (_, vb) in zip(a, b, strict=True):
        assert va == vb or None not in (va, vb) and _rel_close(vb, va, rtol=1e-5), (k, va, vb)
    with pytest.raises(ValueError, match="other settings"):
        C.calibrate(model, windows, config, meta={"model": "other"}, partial_path=partial)


# ------------------------------------------------------------------------------ model_out_norm

def test_model_out_norm_equals_brute_force(tiny, windows):
    """Brute force on the model: one block quantized in the params, the final hidden state."""
    cfg, model = tiny
    ids = windows[:1, :32]
    scheme = QScheme.parse("w4a16_g-1_sym")
    res = C.calibrate(model, ids, C.CalibConfig(schemes=(scheme.name,), layers=(4,),
                                                metric="model_out_norm"), meta={})
    got = res["losses"][scheme.name]["4"]

    @nnx.jit
    def _final(m, ids):
        x = m.embed_tokens(ids)
        pos = jnp.arange(ids.shape[1])
        for layer in m.layers:
            x = layer(x, pos)
        return m.final_norm(x)

    def final_hidden(m):
        return np.asarray(_final(m, jnp.asarray(ids)), np.float64)

    ref = final_hidden(model)
    mlp = model.layers[4].mlp
    for e, b in [(0, "gate"), (5, "down"), (11, "up"), (cfg.num_experts, "down")]:
        param = getattr(mlp.experts, b) if e < cfg.num_experts \
            else getattr(mlp.shared, f"{b}_proj").kernel
        orig = param[...]
        new = orig.at[e].set(fake_quant_weight(orig[e], scheme)) if e < cfg.num_experts \
            else fake_quant_weight(orig, scheme)
        param[...] = new
        try:
            want = float(np.linalg.norm(final_hidden(model) - ref))
        finally:
            param[...] = orig
        assert abs(want - got[str(e)][BLOCKS.index(b)]) <= 1e-3 * want + 1e-6, (e, b, want)


# ------------------------------------------------------------------------------ trace

def test_trace_counts_match_model_routing(tiny, windows):
    cfg, model = tiny
    counts, wsums = T.trace_counts(model, windows, batch_tokens=64)
    _, captured = forward_hidden(model, jnp.asarray(windows), with_logits=False)
    for j, i in enumerate(cfg.moe_layers):
        xn = captured[i].reshape(-1, cfg.hidden_size)
        idx, wt = route(model.layers[i].mlp.router_logits(xn), cfg)
        idx = np.asarray(idx).reshape(windows.shape[0], -1)
        wt = np.asarray(wt, np.float64).reshape(windows.shape[0], -1)
        for s in range(windows.shape[0]):
            want = np.bincount(idx[s], minlength=cfg.num_experts)
            np.testing.assert_array_equal(counts[j, s], want)
            np.testing.assert_allclose(wsums[j, s],
                                       np.bincount(idx[s], wt[s], minlength=cfg.num_experts),
                                       rtol=1e-5, atol=1e-5)
    tr = T.build_trace(cfg, counts, wsums, model="tiny", text=["t"], num_tokens=64)
    for i in cfg.moe_layers:
        freq = tr[f"layer-{i}"]["access_freq"]
        assert abs(sum(freq) - 64 * cfg.num_experts_per_tok) <= cfg.num_experts
        assert tr[f"layer-{i}"]["percentile_stats"]["1"]["freq"] == [max(freq)]
    assert tr["num_shared_experts"] == cfg.shared_intermediate_size / cfg.moe_intermediate_size


# ------------------------------------------------------------------------------ CLI

def test_cli_trace_and_calibrate(tiny_dir, tmp_path, capsys):
    from mxmoe_jax.cli import main

    require_shared(BOOKS_CALIB)
    trace_json, png = tmp_path / "trace.json", tmp_path / "trace.png"
    common = ["--model", str(tiny_dir), "--text", str(BOOKS_CALIB), "--seqlen", "32",
              "--nsamples", "2"]
    assert main(["trace", *common, "--out", str(trace_json), "--plot", str(png)]) == 0
    tr = T.load_trace(trace_json)
    assert tr["num_samples"] == 2 and tr["num_tokens"] == 32 and png.stat().st_size > 0
    loss_json = tmp_path / "loss.json"
    args = ["calibrate", *common, "--schemes", "w4a16_g-1_asym", "w8a8_g-1_sym",
            "--layers", "5", "--out", str(loss_json)]
    assert main(args) == 0
    data = C.load_losses(loss_json)
    assert data["meta"]["num_tokens"] == 64 and data["meta"]["method"] == "rtn"
    assert set(data["losses"]) == {"w4a16_g-1_asym", "w8a8_g-1_sym"}
    assert list(data["losses"]["w8a8_g-1_sym"]) == ["5"]
    assert not (tmp_path / "loss.json.partial.json").exists()
    assert main(args) == 2  # exists, no --force
    assert "--force" in capsys.readouterr().err
    assert main(["calibrate", *common, "--schemes", "w5a16", "--out", str(tmp_path / "x")]) == 2
