"""Memory maps a process holds per compiled XLA executable, and what ``jax.clear_caches`` frees.

``python -m bench.compile_maps``: 300 distinct jitted functions compiled, the process's
``/proc/self/maps`` line count before, after, after ``jax.clear_caches()``, and after 300 more.
Linux caps a process at ``vm.max_map_count`` maps (65530 by default): the reason
``tests/conftest.py`` clears the caches after each test module.
"""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp


def maps() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def compile_many(n: int = 300) -> None:
    for i in range(n):
        f = jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x @ x.T).sum())
        f(jnp.ones((8 + i, 8))).block_until_ready()


def main() -> int:
    print(f"JAX {jax.__version__}, {jax.devices()[0].platform}")
    print("start", maps())
    compile_many()
    print("after 300 compiles", maps())
    jax.clear_caches()
    gc.collect()
    print("after jax.clear_caches()", maps())
    compile_many()
    print("after 300 more", maps())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
