"""The timing helper's guard: a timed function must take its weights as arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxmoe_jax.perf.timing import no_captured_constants

LIMIT = 64 * 1024


def test_a_closure_over_weights_is_refused_and_arguments_pass():
    w = jax.random.normal(jax.random.key(0), (256, 128))  # 128 KiB of f32
    x = jnp.ones((4, 256))
    closed = jax.jit(lambda v: v @ w)
    with pytest.raises(ValueError, match="closed_fn closes over .* pass the weights as arguments"):
        with no_captured_constants("closed_fn", limit=LIMIT):
            closed(x)
    with no_captured_constants("as_arguments", limit=LIMIT):
        y = jax.jit(lambda v, w: v @ w)(x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=1e-6)
    before = jax.config.jax_captured_constants_warn_bytes
    with no_captured_constants("nothing", limit=LIMIT):
        pass
    assert jax.config.jax_captured_constants_warn_bytes == before  # restored


def test_jitted_moe_forward_takes_the_weights_as_arguments():
    from bench.model_layer import qwen_moe_config
    from mxmoe_jax.models.moe import MoEBlock, jitted_moe_forward, moe_forward

    cfg = qwen_moe_config(dict(hidden=64, experts=4, topk=2, inter=64, shared=64), shared=True)
    block = MoEBlock(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 64))
    with pytest.raises(ValueError, match="pass the weights as arguments"):
        with no_captured_constants("closure", limit=LIMIT):
            jax.jit(lambda v: moe_forward(block, v))(x)
    f, state = jitted_moe_forward(block)
    with no_captured_constants("jitted_moe_forward", limit=LIMIT):
        y = f(x, state)
    np.testing.assert_allclose(np.asarray(y), np.asarray(moe_forward(block, x)), rtol=2e-5,
                               atol=1e-6)
    routed = block.experts.weights()
    with no_captured_constants("jitted_moe_forward", limit=LIMIT):
        y2 = f(x, state, routed)  # replacement weights are arguments too
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
