"""GPTQ: agreement with a straightforward NumPy float64 GPTQ, Hessian accumulation, edge cases,
full-f32 products on every backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mxmoe_jax.quant.gptq import (
    GPTQConfig,
    gptq_quantize,
    hessian_finalize,
    hessian_init,
    hessian_update,
    hessian_update_padded,
)
from mxmoe_jax.quant.packing import pack, unpack
from mxmoe_jax.quant.qtensor import dequantize
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import QScheme

SCHEMES = ["w4a16_g-1_asym", "w4a16_g16_asym", "w3a16_g16_sym", "w2a16_g32_asym",
           "w8a8_g-1_sym", "w4a4_g-1_sym", "w4a4_g16_sym", "w8a8_g-1_fp8"]


# -- an independent float64 statement of the algorithm (no blocks, explicit inverse) -------------

def _f16_up(x):
    h = np.asarray(x, np.float64).astype(np.float16)
    return np.where(h < x, np.nextafter(h, np.float16(np.inf)), h).astype(np.float64)


def _f16_down(x):
    h = np.asarray(x, np.float64).astype(np.float16)
    return np.where(h > x, np.nextafter(h, np.float16(-np.inf)), h).astype(np.float64)


def _params(lo, hi, scheme):
    if scheme.fp8 or scheme.sym:
        qmax = 448.0 if scheme.fp8 else scheme.qmax
        s = _f16_up(np.maximum(-lo, hi) / qmax)
        return np.where(s == 0, 1.0, s), np.zeros_like(s)
    o = _f16_down(lo)
    s = _f16_up((hi - o) / scheme.qmax)
    return np.where(s == 0, 1.0, s), o


def _fake(x, s, o, scheme):
    if scheme.fp8:
        import ml_dtypes

        y = np.clip(x / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
        return y * s
    q = np.clip(np.round((x - o) / s), scheme.qmin, scheme.qmax)
    return q * s + o


def reference_gptq(w, h, scheme, *, percdamp=0.01, act_order=False, static_groups=False):
    """Row by row: quantize row i, push (w_i - q_i) / U_ii into every later row."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    k, n = w.shape
    gs = k if scheme.group_size == -1 else scheme.group_size
    wg = w.reshape(k // gs, gs, n)
    s_fix, o_fix = _params(wg.min(1), wg.max(1), scheme)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[perm], h[perm][:, perm]
    h += percdamp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    out = np.zeros_like(w)
    fly = scheme.group_size != -1 and not static_groups
    for i in range(k):
        if fly:
            if i % gs == 0:
                s, o = _params(w[i:i + gs].min(0), w[i:i + gs].max(0), scheme)
        else:
            s, o = s_fix[perm[i] // gs], o_fix[perm[i] // gs]
        out[i] = _fake(w[i], s, o, scheme)
        err = (w[i] - out[i]) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
    res = np.zeros_like(out)
    res[perm] = out
    return res


def _problem(seed, k=64, n=24, m=400):
    rng = np.random.default_rng(seed)
    # correlated inputs with uneven channel scales, as real activations have
    mix = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    x = (rng.standard_normal((m, k)) @ mix) * rng.uniform(0.2, 3.0, k)
    w = rng.standard_normal((k, n)) * 0.1
    return x.astype(np.float32), w.astype(np.float32)


# act-order once per grid layout (sym/asym/fp8 x per channel/K-groups) to keep CI short
CASES = [(s, "plain") for s in SCHEMES] + [(s, "act_order") for s in (
    "w4a16_g-1_asym", "w3a16_g16_sym", "w2a16_g32_asym", "w8a8_g-1_fp8")]


@pytest.mark.parametrize(("name", "order"), CASES)
def test_matches_numpy_float64(name, order):
    scheme = QScheme.parse(name)
    x, w = _problem(sum(map(ord, name + order)))
    h = (x.astype(np.float64).T @ x) / len(x)
    act = order == "act_order"
    cfg = GPTQConfig(block_size=32, act_order=act, static_groups=act)
    qw = gptq_quantize(w, h.astype(np.float32), scheme, cfg)
    got = np.asarray(dequantize(qw))
    want = reference_gptq(w, h, scheme, act_order=act, static_groups=act)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    scale = np.asarray(qw.scale)
    np.testing.assert_array_equal(scale, scale.astype(np.float16).astype(np.float32))
    # GPTQ's output is a QuantizedWeight like RTN's: the kernels' packed layout holds it exactly
    back = unpack(pack(qw))
    np.testing.assert_array_equal(np.asarray(back.codes).astype(np.float32),
                                  np.asarray(qw.codes).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(dequantize(back)), got)


def test_static_groups_and_block_sizes_agree_with_reference():
    scheme = QScheme.parse("w4a16_g16_asym")
    x, w = _problem(11, k=96)
    h = (x.astype(np.float64).T @ x) / len(x)
    want = reference_gptq(w, h, scheme, static_groups=True)
    for block in (16, 48, 128):  # 128 > K: one padded block
        cfg = GPTQConfig(block_size=block, static_groups=True)
        got = np.asarray(dequantize(gptq_quantize(w, h.astype(np.float32), scheme, cfg)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["w4a16_g-1_asym", "w3a16_g16_asym", "w4a4_g-1_sym"])
def test_output_error_below_rtn(name):
    x, w = _problem(5)
    h = x.T.astype(np.float64) @ x / len(x)
    wq = np.asarray(dequantize(gptq_quantize(w, h.astype(np.float32), name)))
    wr = np.asarray(fake_quant_weight(w, name))
    y = x @ w
    assert np.linalg.norm(x @ wq - y) < 0.9 * np.linalg.norm(x @ wr - y)


def test_hessian_streaming_matches_numpy():
    rng = np.random.default_rng(0)
    e, k = 4, 32
    sizes = [np.array([5, 0, 9, 2]), np.array([0, 7, 3, 1])]
    state = hessian_init(e, k)
    xs = []
    for gs in sizes:
        x = rng.standard_normal((int(gs.sum()) + 6, k)).astype(np.float32)  # 6 padding rows
        x[int(gs.sum()):] = 1e3  # padding must be ignored
        state = hessian_update(state, x, gs.astype(np.int32))
        xs.append(np.split(x[: gs.sum()], np.cumsum(gs)[:-1]))
    h = np.asarray(hessian_finalize(state))
    for ei in range(e):
        rows = np.concatenate([b[ei] for b in xs]).astype(np.float64)
        want = rows.T @ rows / max(len(rows), 1)
        np.testing.assert_allclose(h[ei], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.count), sizes[0] + sizes[1])

    # the padded [E, C, K] form gives the same
    cap = 9
    xp = np.full((e, cap, k), 7.0, np.float32)
    for ei in range(e):
        xp[ei, : sizes[0][ei]] = xs[0][ei]
    sp = hessian_update_padded(hessian_init(e, k), xp, sizes[0].astype(np.int32))
    s1 = hessian_update(hessian_init(e, k), np.concatenate(xs[0]), sizes[0].astype(np.int32))
    np.testing.assert_allclose(np.asarray(sp.xtx), np.asarray(s1.xtx), rtol=1e-5, atol=1e-4)


def test_vmapped_layer_matches_per_expert_and_empty_expert_is_rtn():
    rng = np.random.default_rng(1)
    e, k, n = 3, 64, 16
    w = (rng.standard_normal((e, k, n)) * 0.1).astype(np.float32)
    hs = []
    for ei in range(e):
        x, _ = _problem(ei + 20, k=k, m=100)
        hs.append(x.T @ x / len(x))
    hs[1] = np.zeros((k, k), np.float32)  # an expert no calibration token was routed to
    h = np.stack(hs).astype(np.float32)
    scheme = "w4a16_g16_asym"
    layer = np.asarray(dequantize(gptq_quantize(w, h, scheme)))
    for ei in range(e):
        one = np.asarray(dequantize(gptq_quantize(w[ei], h[ei], scheme)))
        np.testing.assert_allclose(layer[ei], one, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(layer[1], np.asarray(fake_quant_weight(w[1], scheme)))


def test_dead_inputs_and_errors():
    x, w = _problem(3, k=32, n=8)
    x[:, 5] = 0  # a channel no token uses
    h = x.T @ x / len(x)
    qw = gptq_quantize(w, h, "w4a16_g-1_asym")
    deq = np.asarray(dequantize(qw))
    assert np.all(np.isfinite(deq))
    # kept and rounded (the reference GPTQ zeroes it); it takes no feedback, so it is RTN's row
    rtn = np.asarray(fake_quant_weight(w, "w4a16_g-1_asym"))
    np.testing.assert_allclose(deq[5], rtn[5], rtol=0, atol=1e-6)
    assert np.abs(deq[5]).max() > 0
    # all-zero and constant weight columns stay finite; zero columns stay zero
    wz = w.copy()
    wz[:, 0] = 0
    wz[:, 1] = 0.375
    dz = np.asarray(dequantize(gptq_quantize(wz, h, "w4a16_g-1_asym")))
    assert np.all(np.isfinite(dz))
    np.testing.assert_array_equal(dz[:, 0], 0)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_quantize(w, h, "w4a16_g16_asym", GPTQConfig(act_order=True))
    with pytest.raises(ValueError, match="h: expected"):
        gptq_quantize(w, h[:16, :16], "w4a16_g-1_asym")
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, h, "w4a16_g128_asym")


# -- full f32 products wherever GPTQ runs (on the GPU, default-precision f32 matmuls are TF32-like)

def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, scan, loops, cond, vmap)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else (v,):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # ClosedJaxpr
                    yield from _eqns(sub.jaxpr)
                elif hasattr(sub, "eqns"):  # Jaxpr
                    yield from _eqns(sub)


_GPTQ_CALLS = {
    "per_channel": ("w4a16_g-1_asym", GPTQConfig(block_size=32)),
    "groups_on_the_fly": ("w3a16_g16_sym", GPTQConfig(block_size=32)),
    "act_order_static": ("w4a16_g16_asym", GPTQConfig(act_order=True, static_groups=True)),
    "fp8": ("w8a8_g-1_fp8", GPTQConfig()),
}


def _gptq_and_hessian_fns():
    k, n, e = 64, 24, 3
    w = jax.ShapeDtypeStruct((e, k, n), jnp.float32)
    h = jax.ShapeDtypeStruct((e, k, k), jnp.float32)
    fns = {f"gptq_{tag}{'_vmapped' if ndim == 3 else ''}":
           (lambda w, h, name=name, cfg=cfg: gptq_quantize(w, h, name, cfg).codes,
            (w, h) if ndim == 3 else (jax.ShapeDtypeStruct((k, n), jnp.float32),
                                      jax.ShapeDtypeStruct((k, k), jnp.float32)))
           for tag, (name, cfg) in _GPTQ_CALLS.items() for ndim in (2, 3)}
    state = hessian_init(e, k)
    fns["hessian_update"] = (lambda s, x, g: hessian_update(s, x, g).xtx,
                             (state, jax.ShapeDtypeStruct((300, k), jnp.float32),
                              jax.ShapeDtypeStruct((e,), jnp.int32)))
    fns["hessian_update_padded"] = (lambda s, x, c: hessian_update_padded(s, x, c).xtx,
                                    (state, jax.ShapeDtypeStruct((e, 40, k), jnp.float32),
                                     jax.ShapeDtypeStruct((e,), jnp.int32)))
    return fns


@pytest.mark.parametrize("ambient", [None, "bfloat16"])
def test_every_product_is_full_f32(ambient):
    """Every dot_general the Hessians and the solve trace is HIGHEST, even when the caller asks
    for low-precision matmuls."""
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for label, (fn, args) in _gptq_and_hessian_fns().items():
        if ambient is None:
            jaxpr = jax.make_jaxpr(fn)(*args)
        else:
            with jax.default_matmul_precision(ambient):
                jaxpr = jax.make_jaxpr(fn)(*args)
        dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
        assert dots, label
        for d in dots:
            assert d.params["precision"] == highest, (label, d.params["precision"])


def test_cuda_lowering_keeps_highest_precision():
    """What XLA gets for the GPU (lowered here, on the CPU): every dot_general is HIGHEST and the
    Cholesky factorization is cuSOLVER's potrf."""
    for label, (fn, args) in _gptq_and_hessian_fns().items():
        text = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
        dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
        assert dots, label
        for ln in dots:
            assert "precision = [HIGHEST, HIGHEST]" in ln, (label, ln)
        if label.startswith("gptq"):
            assert "cusolver_potrf" in text, label
