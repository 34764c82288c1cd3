"""Compile vs first-run time of each expert-GEMM path on the qwen1.5-moe gate_up shape.

``python -m bench.compile_times [TOKENS]`` (default 32) on an NVIDIA GPU: for the uniform
schemes (``gmm``), then for each mix of ``bench.mixed_layer.MIXES`` the one-launch mixed kernel,
the per-scheme launches and the reference, prints host seconds to pack the weights, to lower and
compile the jitted call, and for its first run. These are host timers on purpose: compile time
is host time. Kernel speed is measured elsewhere (``bench.mixed_layer``, device time).
"""

from __future__ import annotations

import sys
import time

import numpy as np

T0 = time.perf_counter()


def _say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}] {msg}", flush=True)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    from bench.gmm import zipf_group_sizes
    from bench.mixed_layer import MIXES, assignment_of, stacks_for
    from kernels.pallas import gmm, mixed_grouped_matmul
    from mxmoe_jax import ops

    argv = sys.argv[1:] if argv is None else argv
    tokens = int(argv[0]) if argv else 32
    e, d, n, k = 60, 2048, 2816, 4  # qwen1.5-moe: 60 experts, hidden 2048, gate_up 2 x 1408
    gs_np = zipf_group_sizes(tokens, e, k, seed=0)
    gs = jnp.asarray(gs_np)
    x = jax.random.normal(jax.random.key(1), (tokens * k, d)).astype(jnp.bfloat16)
    w = 0.02 * jax.random.normal(jax.random.key(2), (e, d, n))

    def pack(assignment, schemes):
        return jax.block_until_ready(stacks_for(w, assignment, schemes))

    for name in ("w16a16", "w4a16_g128_asym", "w8a8_g-1_sym", "w4a4_g-1_sym"):
        ((wq, _),), tp = _timed(lambda name=name: pack((0,) * e, [name]))
        f = jax.jit(lambda v, g, wq=wq: gmm(v, wq, g))
        c, tc = _timed(lambda f=f: f.lower(x, gs).compile())
        _, tr = _timed(lambda c=c: jax.block_until_ready(c(x, gs)))
        _say(f"uniform {name}: pack {tp:.1f}s compile {tc:.1f}s first run {tr:.2f}s")
    for mix_name, mix in MIXES.items():
        a = assignment_of(gs_np, mix)
        parts, tp = _timed(lambda a=a, mix=mix: pack(a, [s for s, _ in mix]))
        one = jax.jit(lambda v, g, p=parts, a=a: mixed_grouped_matmul(v, [q for q, _ in p], g, a))
        c, tc = _timed(lambda f=one: f.lower(x, gs).compile())
        _, tr = _timed(lambda c=c: jax.block_until_ready(c(x, gs)))
        _say(f"mixed {mix_name}: pack {tp:.1f}s compile {tc:.1f}s run {tr:.2f}s")
        per = jax.jit(lambda v, g, p=parts: ops.grouped_matmul_by_scheme(
            v, p, g, impl="kernel", launch="per_scheme"))
        _, tc = _timed(lambda f=per: f.lower(x, gs).compile())
        _say(f"per-scheme {mix_name}: compile {tc:.1f}s")
        _, tr = _timed(lambda p=parts: np.asarray(ops._by_scheme_reference(x, p, gs, jnp.float32)))
        _say(f"reference {mix_name}: {tr:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
