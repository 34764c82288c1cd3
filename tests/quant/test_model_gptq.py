"""GPTQ of a whole model under a plan: every planned block, shapes, and the logits it gives."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mxmoe_jax.quant.fakequant import QuantPlan, fake_quantize_params, make_quant_forward
from mxmoe_jax.quant.model_gptq import gptq_model
from mxmoe_jax.quant.rotation import rotate_params
from tests.conftest import FIXTURES
from tests.quant.helpers import load_hf_flat


def test_gptq_model_covers_the_plan_and_beats_rtn_on_its_calibration_tokens():
    from mxmoe_jax.models import forward, from_flat_params

    d = FIXTURES / "hf" / "qwen2_moe_sparse_step"  # dense and MoE layers, a gated shared expert
    cfg, flat = load_hf_flat(d)
    cfg, flat, rot = rotate_params(cfg, flat, seed=1)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    plan = QuantPlan.uniform(cfg, "w3a16_g-1_asym", dense=True)
    model = from_flat_params(cfg, flat)
    q = gptq_model(model, calib, plan, rotation=rot, batch_windows=2)
    assert set(q) == {k for k, _ in plan.items}
    for (layer, e, b), qw in q.items():
        assert qw.scheme.name == "w3a16_g-1_asym"
        key = f"layers/{layer}/mlp/" + ("experts/" + b if cfg.is_moe_layer(layer)
                                        and e < cfg.num_experts else
                                        ("shared/" if cfg.is_moe_layer(layer) else "")
                                        + f"{b}_proj/kernel")
        want = flat[key].shape[1:] if "experts" in key else flat[key].shape
        assert qw.codes.shape == want
    ref = np.asarray(forward(model, jnp.asarray(calib)))

    f = make_quant_forward(plan, rot)

    def err(quantized):
        m = from_flat_params(cfg, fake_quantize_params(cfg, flat, plan, quantized=quantized))
        return float(np.linalg.norm(np.asarray(f(m, jnp.asarray(calib))) - ref))

    e_gptq, e_rtn = err(q), err(None)
    assert np.isfinite(e_gptq) and e_gptq < e_rtn
