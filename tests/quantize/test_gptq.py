"""GPTQ of a whole model under an allocation: every allocated block, shapes, and its logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mxmoe_jax.alloc.qconfig import Allocation
from mxmoe_jax.models import forward, from_flat_params
from mxmoe_jax.quantize.apply import quantize_model
from mxmoe_jax.quantize.gptq import gptq_weights
from mxmoe_jax.quantize.rotation import rotate_model
from tests.conftest import FIXTURES
from tests.quant.helpers import load_hf_flat


def test_gptq_weights_cover_the_allocation_and_beat_rtn_on_its_calibration_tokens():
    d = FIXTURES / "hf" / "qwen2_moe_sparse_step"  # dense and MoE layers, a gated shared expert
    cfg, flat = load_hf_flat(d)
    rotated, _ = rotate_model(from_flat_params(cfg, flat), seed=1)
    cfg = rotated.cfg
    rng = np.random.default_rng(0)
    calib = rng.integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    alloc = Allocation.uniform(cfg, "w3a16_g-1_asym", dense=True)
    q = gptq_weights(rotated, calib, alloc, batch_windows=2)
    assert set(q) == {(layer, e, "down" if b == "down" else "gate_up")
                      for (layer, e, b), _ in alloc.items}
    for (layer, e, proj), qw in q.items():
        assert qw.scheme.name == "w3a16_g-1_asym"
        b = "down" if proj == "down" else "gate"
        key = f"layers/{layer}/mlp/" + ("experts/" + b if cfg.is_moe_layer(layer)
                                        and e < cfg.num_experts else
                                        ("shared/" if cfg.is_moe_layer(layer) else "")
                                        + f"{b}_proj/kernel")
        k, n = flat[key].shape[1:] if "experts" in key else flat[key].shape
        want = (k, n) if proj == "down" else (k, 2 * n)  # gate_up fused [D, 2I]
        assert qw.codes.shape == want
    ids = jnp.asarray(calib)
    ref = np.asarray(forward(rotated, ids))

    def err(quantized):
        m = quantize_model(rotated, alloc, quantized=quantized)
        return float(np.linalg.norm(np.asarray(forward(m, ids)) - ref))

    e_gptq, e_rtn = err(q), err(None)
    assert np.isfinite(e_gptq) and e_gptq < e_rtn
