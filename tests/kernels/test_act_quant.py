"""Activation-quantization kernel vs the quantization core's definition (``quant.act``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mxmoe_jax.kernels.pallas.act_quant import quantize_activations

from mxmoe_jax.quant.act import quantize_activations as reference


@pytest.mark.parametrize("name,shape", [("w8a8_g-1_sym", (19, 200)), ("w4a4_g-1_sym", (5, 1408)),
                                        ("w4a4_g128_sym", (19, 384)),
                                        ("w8a8_g-1_fp8", (19, 200))])
def test_matches_reference(name, shape, interpret):
    x = jax.random.normal(jax.random.key(shape[1]), shape, jnp.float32).astype(jnp.bfloat16)
    x = x.at[3].set(0)  # an all-zero token gets scale 1 and zero codes
    q, s = quantize_activations(x, name, interpret=interpret)
    qr, sr = reference(x, name)
    assert q.dtype == qr.dtype and q.shape == qr.shape and s.shape == sr.shape
    np.testing.assert_allclose(np.asarray(s), np.asarray(sr), rtol=1e-6)
    d = np.abs(np.asarray(q, np.float32) - np.asarray(qr, np.float32))
    if "fp8" in name:
        # e4m3 neighbours differ by one ulp (relative 2^-3) when x / scale differs in the last bit
        assert np.mean(d > 0) < 0.01
    else:
        # x / scale can land within one f32 ulp of a .5 tie; then the code differs by one
        assert d.max() <= 1 and np.mean(d > 0) < 0.01
    assert np.all(np.asarray(q[3], np.float32) == 0) and float(s[3, 0]) == 1.0


def test_rejects_bad_group_and_weight_only():
    x = jnp.ones((4, 192), jnp.bfloat16)
    with pytest.raises(ValueError, match="group_size"):
        quantize_activations(x, "w4a4_g48_sym")
    with pytest.raises(ValueError, match="a_bits"):
        quantize_activations(x, "w4a16_g128_asym")
