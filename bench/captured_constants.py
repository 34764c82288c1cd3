"""Weights closed over vs passed as arguments: program size and lower / compile seconds.

``python -m bench.captured_constants [EXPERTS]`` (default 16): a grouped projection
``[64, 2048] x [E, 2048, 2816]`` bf16 (Qwen1.5-MoE's gate_up) under ``jit``, once with the weights
closed over (``jit`` compiles them into the program as constants) and once with them as an
argument. Prints the program text's size and host seconds to lower and to compile (host timers on
purpose: compile time is host time). Runs on any device.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    e = int(argv[0]) if argv else 16
    print(f"JAX {jax.__version__}, {jax.devices()[0].platform}; E = {e}, K = 2048, N = 2816, bf16")
    w = jax.random.normal(jax.random.key(0), (e, 2048, 2816), jnp.float32).astype(jnp.bfloat16)
    x = jnp.ones((64, 2048), jnp.bfloat16)

    def proj(v, w):
        return jnp.einsum("td,edn->ten", v, w)

    jax.config.update("jax_captured_constants_warn_bytes", -1)  # the closure is the point here
    for how, fn, args in (("closed over", jax.jit(lambda v, w=w: proj(v, w)), (x,)),
                          ("as an argument", jax.jit(proj), (x, w))):
        t = time.perf_counter()
        lowered = fn.lower(*args)
        t_lower = time.perf_counter() - t
        size = len(lowered.as_text())
        t = time.perf_counter()
        lowered.compile()
        t_compile = time.perf_counter() - t
        print(f"weights {how}: program text {size / 1e6:.3f} MB, lower {t_lower:.3f} s, "
              f"compile {t_compile:.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
