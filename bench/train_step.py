"""Seconds per training step of the default model (``mxmoe_jax.default_model``), jitted, CPU or GPU.

Host wall-clock over 20 steps after one warm-up (a whole-step figure for comparing code versions
on one machine, not a kernel time): ``python -m bench.train_step``; with another checkout on
``PYTHONPATH`` it times that version.
"""

from __future__ import annotations


def main() -> int:
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from mxmoe_jax.config import ModelConfig
    from mxmoe_jax.default_model import DefaultRecipe, hf_config
    from mxmoe_jax.models import MoECausalLM

    r = DefaultRecipe()
    cfg = ModelConfig.from_hf(hf_config(r))
    model = MoECausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    @nnx.jit
    def step(m, o, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(m, batch)
        o.update(m, grads)
        return loss

    batch = jnp.asarray(np.random.default_rng(0).integers(0, r.vocab_size, (16, 129)), jnp.int32)
    float(step(model, opt, batch))
    t = time.perf_counter()
    for _ in range(20):
        float(step(model, opt, batch))
    print("seconds per step", (time.perf_counter() - t) / 20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
