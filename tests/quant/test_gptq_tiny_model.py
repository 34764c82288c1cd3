"""GPTQ beats RTN on the tiny trained model's real experts with real routed activations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mxmoe_jax.quant.act import fake_quant_activations
from mxmoe_jax.quant.gptq import gptq_quantize, hessian_finalize, hessian_init, hessian_update
from mxmoe_jax.quant.qtensor import dequantize
from mxmoe_jax.quant.rtn import fake_quant_weight
from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES, QScheme
from tests.conftest import BOOKS_CALIB, BOOKS_EVAL, TINY_MODEL, require_shared

SCHEMES = ORIGINAL_SCHEMES + ("w8a8_g-1_fp8", "w4a16_g-1_sym")
LAYER = 3  # a middle layer


@functools.lru_cache(maxsize=1)
def _setup():
    from mxmoe_jax.data import load_tokenizer, tokenize_texts, whole_windows
    from mxmoe_jax.models import forward_hidden, from_flat_params
    from mxmoe_jax.models.moe import dispatch, route
    from tests.quant.helpers import load_hf_flat

    cfg, flat = load_hf_flat(TINY_MODEL)
    model = from_flat_params(cfg, flat)
    tok = load_tokenizer(TINY_MODEL)
    block = model.layers[LAYER].mlp

    def routed_inputs(path, n):
        ids = whole_windows(tokenize_texts(tok, [path]), 256, n)
        _, cap = forward_hidden(model, jnp.asarray(ids), capture=[LAYER], with_logits=False)
        x_td = cap[LAYER].reshape(-1, cfg.hidden_size)
        idx, weight = route(block.router_logits(x_td), cfg)
        return x_td, dispatch(x_td, idx, cfg.num_experts)

    return cfg, block, routed_inputs(BOOKS_CALIB, 8), routed_inputs(BOOKS_EVAL, 2)


def _hidden(block, x_sorted, gs):
    """FP down_proj inputs of the routed rows."""
    from mxmoe_jax.ops import grouped_matmul

    w = block.experts
    g = grouped_matmul(x_sorted, w.gate[...], gs, out_dtype=jnp.float32)
    u = grouped_matmul(x_sorted, w.up[...], gs, out_dtype=jnp.float32)
    return jnp.asarray(g * (1 / (1 + jnp.exp(-g))) * u)


@pytest.mark.slow
def test_gptq_layer_error_below_rtn_for_every_scheme():
    from mxmoe_jax.models import moe

    require_shared(TINY_MODEL)
    require_shared(BOOKS_CALIB)
    cfg, block, (_, calib), (x_eval, _) = _setup()
    e = cfg.num_experts
    gs = calib.group_sizes
    h_in = hessian_finalize(hessian_update(hessian_init(e, cfg.hidden_size), calib.x_sorted, gs))
    hid = _hidden(block, calib.x_sorted, gs)
    h_hid = hessian_finalize(hessian_update(hessian_init(e, hid.shape[1]), hid, gs))
    assert int(np.sum(np.asarray(gs) > 0)) == e  # every expert saw calibration tokens
    w = {b: getattr(block.experts, b)[...] for b in ("gate", "up", "down")}

    @functools.partial(jax.jit, static_argnames="scheme")
    def routed(x, gate, up, down, scheme=None):
        """The routed experts' weighted sum ``[T, D]`` f32 with these weights (and this scheme's
        activation fake-quant at every block input)."""
        def act(v, _block, _expert_ids):
            if scheme.group_size != -1 and v.shape[1] % scheme.group_size:
                return v  # the block this group size cannot split stays unquantized
            return fake_quant_activations(v, scheme)

        idx, weight = moe.route(block.router_logits(x), cfg)
        d = moe.dispatch(x, idx, cfg.num_experts)
        rows = moe.SortedRows(d.group_sizes, d.x_sorted.shape[0],
                              precision=jax.lax.Precision.HIGHEST)
        hooks = moe.Hooks(act_quant=None if scheme is None or scheme.weight_only else act)
        y = moe.swiglu(d.x_sorted, moe.ExpertWeights.dense(gate, up, down), rows, hooks=hooks,
                       dtype=jnp.float32)
        return moe.combine(y, d, weight)

    ref = routed(x_eval, w["gate"], w["up"], w["down"])  # [T, D] f32, FP

    for name in SCHEMES:
        scheme = QScheme.parse(name)
        errs = {}
        for method in ("rtn", "gptq"):
            q = {}
            # gate and up share their input, hence their Hessian: one GPTQ call on [gate | up]
            # (output columns are quantized independently, so this equals two calls)
            n = w["gate"].shape[2]
            for b, wb in (("gate_up", jnp.concatenate([w["gate"], w["up"]], axis=2)),
                          ("down", w["down"])):
                if scheme.group_size != -1 and wb.shape[1] % scheme.group_size:
                    qb = wb  # e.g. g128 on down (K = 192): left in full precision
                elif method == "rtn":
                    qb = fake_quant_weight(wb, scheme)
                else:
                    qb = dequantize(gptq_quantize(wb, h_hid if b == "down" else h_in, scheme))
                if b == "down":
                    q["down"] = qb
                else:
                    q["gate"], q["up"] = qb[..., :n], qb[..., n:]
            out = routed(x_eval, q["gate"], q["up"], q["down"],
                         scheme=None if scheme.weight_only else scheme)
            errs[method] = float(jnp.linalg.norm(out - ref))
        # held-out tokens: GPTQ's advantage must generalise, not just fit the calibration set
        assert errs["gptq"] < errs["rtn"], (name, errs)
