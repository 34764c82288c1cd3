"""Tile sweep for ``tgmm`` (the weight-gradient kernel): ``python -m bench.tgmm [--tokens 8192]``.

A Qwen1.5-MoE-sized ``dw`` (60 experts, top-4; ``--k``/``--n`` pick gate/up or down), uniform-random
routing, random normal bf16 data. Each tile is checked against the VJP of XLA's ``lax.ragged_dot``
(independent of the kernel) and timed with ``jax.profiler`` device time (``perf.timing``). Prints a
table and writes JSON to ``bench/results/tgmm-<date>.json`` (date, device, JAX version).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import sys
from pathlib import Path

from mxmoe_jax.perf.shapes import PRESETS

QWEN15 = PRESETS["qwen1.5-moe"]  # the default shape
TILES = [dict(bk=bk, bn=bn, bm=bm, num_warps=nw, num_stages=ns)
         for bk, bn in ((128, 128), (64, 128), (128, 256), (256, 128))
         for bm, nw, ns in ((64, 8, 3), (32, 4, 4), (64, 4, 3))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tgmm", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts", type=int, default=QWEN15.num_experts)
    p.add_argument("--top-k", type=int, default=QWEN15.top_k)
    p.add_argument("--k", type=int, default=QWEN15.hidden)
    p.add_argument("--n", type=int, default=QWEN15.moe_inter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    from jax import lax
    from mxmoe_jax.kernels.pallas.tgmm import DEFAULTS, tgmm

    from mxmoe_jax.perf.timing import device_time_us

    if jax.devices()[0].platform != "gpu":
        raise SystemExit("bench tgmm: needs an NVIDIA GPU (the kernel compiles with Triton)")
    m, e = a.tokens * a.top_k, a.experts
    key = jax.random.key(0)
    counts = jnp.bincount(jax.random.randint(key, (m,), 0, e), length=e).astype(jnp.int32)
    x = jax.random.normal(jax.random.fold_in(key, 1), (m, a.k), jnp.float32).astype(jnp.bfloat16)
    dy = jax.random.normal(jax.random.fold_in(key, 2), (m, a.n), jnp.float32).astype(jnp.bfloat16)
    w0 = jnp.zeros((e, a.k, a.n), jnp.bfloat16)
    _, vjp = jax.vjp(lambda w: lax.ragged_dot(x, w, counts, preferred_element_type=jnp.float32),
                     w0)
    want = jax.jit(lambda d: vjp(d)[0].astype(jnp.float32))(dy.astype(jnp.float32))
    t_ref = device_time_us(jax.jit(lambda d: vjp(d)[0]), dy.astype(jnp.float32), n=3)
    flops = 2.0 * m * a.k * a.n
    rows = []
    print(f"M={m} K={a.k} N={a.n} E={e}; XLA ragged_dot VJP (dw) {t_ref:.1f} us", flush=True)
    for cfg in [dict(DEFAULTS)] + TILES:
        fn = jax.jit(functools.partial(tgmm, **cfg))
        try:
            got = fn(x, dy, counts)
            err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            us = device_time_us(fn, x, dy, counts, n=a.reps)
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile: report, go on
            print(f"{cfg}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        rows.append(dict(tile=cfg, us=us, rel_err=err, tflops=flops / us / 1e6))
        print(f"{cfg}: err {err:.2e}  {us:9.1f} us  {flops / us / 1e6:7.1f} TFLOP/s", flush=True)
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H%MZ")
    res = dict(date=date, device=jax.devices()[0].device_kind, jax=jax.__version__,
               shape=dict(m=m, k=a.k, n=a.n, e=e), ragged_dot_vjp_us=t_ref, rows=rows)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"tgmm-{date}-k{a.k}-n{a.n}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
