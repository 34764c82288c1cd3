"""Seconds per training step of the default model (``mxmoe_jax.default_model``), jitted, CPU or GPU.

Host wall-clock over 20 steps after one warm-up (a whole-step figure for comparing code versions
on one machine, not a kernel time): ``python -m bench.train_step``; with another checkout on
``PYTHONPATH`` it times that version.
"""

from __future__ import annotations


def main() -> int:
    import time

    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from mxmoe_jax.config import ModelConfig
    from mxmoe_jax.default_model import DefaultRecipe, hf_config, train_step
    from mxmoe_jax.models import MoECausalLM

    r = DefaultRecipe()
    cfg = ModelConfig.from_hf(hf_config(r))
    model = MoECausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    step = train_step()

    batch = jnp.asarray(np.random.default_rng(0).integers(0, r.vocab_size, (16, 129)), jnp.int32)
    float(step(model, opt, batch))
    t = time.perf_counter()
    for _ in range(20):
        float(step(model, opt, batch))
    print("seconds per step", (time.perf_counter() - t) / 20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
