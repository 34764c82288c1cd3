"""Compile vs first-run time of each expert-GEMM path on the qwen1.5-moe gate_up shape.

``python -m bench.compile_times [TOKENS]`` (default 32) on an NVIDIA GPU: for the uniform
schemes (``gmm``), then for each mix of ``bench.mixed_layer.MIXES`` the one-launch mixed kernel,
the per-scheme launches and the reference, prints host seconds to pack the weights, to lower and
compile the jitted call, and for its first run. These are host timers on purpose: compile time
is host time. Kernel speed is measured elsewhere (``bench.mixed_layer``, device time).
"""

from __future__ import annotations

import contextlib
import sys
import time

import jax
import numpy as np

T0 = time.perf_counter()
# rows also compiled the old way (weights closed over: jit compiles them in as constants)
CONSTANTS_TOO = ("w16a16", "w4a4_g-1_sym")


@contextlib.contextmanager
def _constants_allowed():
    """JAX warns past 2 GB of captured constants; the comparison row captures ~0.7 GB."""
    old = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", -1)
    try:
        yield
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", old)


def _say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}] {msg}", flush=True)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
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
        f = jax.jit(gmm)  # weights as arguments
        c, tc = _timed(lambda f=f, wq=wq: f.lower(x, wq, gs).compile())
        _, tr = _timed(lambda c=c, wq=wq: jax.block_until_ready(c(x, wq, gs)))
        msg = f"uniform {name}: pack {tp:.1f}s compile {tc:.1f}s first run {tr:.2f}s"
        if name in CONSTANTS_TOO:  # the old way: weights closed over, compiled in as constants
            with _constants_allowed():
                fc = jax.jit(lambda v, g, wq=wq: gmm(v, wq, g))
                _, tcc = _timed(lambda f=fc: f.lower(x, gs).compile())
            msg += f"; weights as constants: compile {tcc:.1f}s"
        _say(msg)
    for mix_name, mix in MIXES.items():
        a = assignment_of(gs_np, mix)
        parts, tp = _timed(lambda a=a, mix=mix: pack(a, [s for s, _ in mix]))
        stacks, ids = [q for q, _ in parts], [ex for _, ex in parts]
        one = jax.jit(lambda v, ws, g, a=a: mixed_grouped_matmul(v, ws, g, a))
        c, tc = _timed(lambda f=one, s=stacks: f.lower(x, s, gs).compile())
        _, tr = _timed(lambda c=c, s=stacks: jax.block_until_ready(c(x, s, gs)))
        _say(f"mixed {mix_name}: pack {tp:.1f}s compile {tc:.1f}s run {tr:.2f}s")
        per = jax.jit(lambda v, ws, g, ids=ids: ops.grouped_matmul_by_scheme(
            v, list(zip(ws, ids, strict=True)), g, impl="kernel", launch="per_scheme"))
        _, tc = _timed(lambda f=per, s=stacks: f.lower(x, s, gs).compile())
        _say(f"per-scheme {mix_name}: compile {tc:.1f}s")
        _, tr = _timed(lambda p=parts: np.asarray(ops._by_scheme_reference(x, p, gs, jnp.float32)))
        _say(f"reference {mix_name}: {tr:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
