"""GPTQ of one whole MoE layer: seconds per layer (Hessians from routed tokens + the vmapped solve).

``python -m bench.gptq_layer [--small] [--schemes w4a16_g128_asym ...] [--act-order]``

Default shape: a Qwen1.5-MoE-A2.7B expert block (60 experts, K = 2048, N = 1408: gate or up),
128 x 2048 calibration tokens routed top-4 over a Zipf-like expert popularity (some experts get
many tokens, some few), random normal weights and tokens. Phases, each timed separately:

1. ``hessian``: stream the tokens in batches of ``--batch`` (one sequence of 2048 tokens each, as
   calibration feeds them), each batch expert-sorted, into ``hessian_update``.
2. ``gptq``: one ``gptq_quantize`` call on the stacked experts (vmapped).

Times are host wall-clock around ``jax.block_until_ready`` after a warm-up call that compiles
(compile excluded; a multi-second job, so dispatch overhead is negligible). On a GPU the solve is
also timed with ``jax.profiler`` (sum of kernel events, ``perf.timing``). As a sanity check the
script prints the layer-output error of GPTQ and RTN on held-out tokens (GPTQ should be lower).
``--small`` runs a CPU-sized problem (8 experts, K = 256, N = 192, 8 x 256 tokens).
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.perf.shapes import PRESETS
from mxmoe_jax.quant.gptq import (
    GPTQConfig,
    gptq_quantize,
    hessian_finalize,
    hessian_init,
    hessian_update,
)
from mxmoe_jax.quant.qtensor import dequantize
from mxmoe_jax.quant.rtn import quantize_rtn

QWEN15 = PRESETS["qwen1.5-moe"]  # the default shape


def zipf_log_popularity(e: int, seed: int, alpha: float = 1.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return -alpha * np.log1p(rng.permutation(e)).astype(np.float32)


def make_batch(key, batch: int, k: int, log_pop: jax.Array, top_k: int):
    """Random tokens [batch, K], routed top-k over Gumbel(log popularity), sorted by expert."""
    kx, kg = jax.random.split(key)
    # correlated channels with uneven scales, like real hidden states (a low-rank shared part):
    # with i.i.d. channels H is diagonal up to sampling noise and GPTQ has nothing to exploit
    kz, kc = jax.random.split(jax.random.key(7))
    chan = jnp.exp(jax.random.normal(kc, (k,)) * 0.5)
    basis = jax.random.normal(kz, (32, k)) * 0.5  # [32, K]
    kx1, kx2 = jax.random.split(kx)
    x = jax.random.normal(kx1, (batch, k)) + jax.random.normal(kx2, (batch, 32)) @ basis
    x = x * chan
    scores = jax.random.gumbel(kg, (batch, log_pop.shape[0])) + log_pop
    _, idx = jax.lax.top_k(scores, top_k)  # [batch, top_k]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    x_sorted = x[order // top_k]
    group_sizes = jnp.bincount(flat, length=log_pop.shape[0]).astype(jnp.int32)
    return x_sorted, group_sizes


def _time(fn, *args, repeat: int = 1) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized problem")
    ap.add_argument("--experts", type=int, default=QWEN15.num_experts)
    ap.add_argument("--k", type=int, default=QWEN15.hidden, help="input features (hidden size)")
    ap.add_argument("--n", type=int, default=QWEN15.moe_inter,
                    help="output features (moe_intermediate)")
    ap.add_argument("--batches", type=int, default=128, help="calibration sequences")
    ap.add_argument("--batch", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--top-k", type=int, default=QWEN15.top_k)
    ap.add_argument("--schemes", nargs="+", default=["w4a16_g128_asym", "w4a16_g-1_asym"])
    ap.add_argument("--act-order", action="store_true", help="act-order (with static groups)")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    if args.small:
        args.experts, args.k, args.n, args.batches, args.batch = 8, 256, 192, 8, 256

    e, k, n = args.experts, args.k, args.n
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); layer E={e} K={k} N={n}; "
          f"{args.batches}x{args.batch} tokens, top-{args.top_k}")
    log_pop = jnp.asarray(zipf_log_popularity(e, 0))
    w = jax.random.normal(jax.random.key(1), (e, k, n), jnp.float32) * 0.02
    batch_fn = jax.jit(make_batch, static_argnums=(1, 2, 4))
    keys = jax.random.split(jax.random.key(2), args.batches + 1)
    batches = [batch_fn(keys[i], args.batch, k, log_pop, args.top_k) for i in range(args.batches)]
    jax.block_until_ready(batches)
    counts = np.sum([np.asarray(g) for _, g in batches], axis=0)
    print(f"tokens per expert: max {counts.max()}, median {int(np.median(counts))}, "
          f"min {counts.min()}, empty {int((counts == 0).sum())}")

    def accumulate(batches):
        state = hessian_init(e, k)
        for x_sorted, gs in batches:
            state = hessian_update(state, x_sorted, gs)
        return hessian_finalize(state)

    t_hess = _time(accumulate, batches, repeat=args.repeat)
    h = accumulate(batches)
    cfg = GPTQConfig(act_order=args.act_order, static_groups=args.act_order)

    # held-out tokens for the sanity check
    x_ev, gs_ev = batch_fn(keys[-1], min(args.batch, 1024), k, log_pop, args.top_k)
    ends = np.cumsum(np.asarray(gs_ev))

    def out_err(wq):
        err = 0.0
        for ei in range(e):
            xe = x_ev[ends[ei] - gs_ev[ei]: ends[ei]]
            err += float(jnp.sum(jnp.square(xe @ (wq[ei] - w[ei]))))
        return err ** 0.5

    results = []
    for name in args.schemes:
        t = _time(lambda w_, h_, s=name: gptq_quantize(w_, h_, s, cfg), w, h, repeat=args.repeat)
        row = {"scheme": name, "hessian_s": t_hess, "gptq_s": t, "layer_s": t_hess + t}
        if dev.platform == "gpu":
            try:
                from mxmoe_jax.perf.timing import device_time_us

                row["gptq_device_s"] = device_time_us(
                    lambda w_, h_, s=name: gptq_quantize(w_, h_, s, cfg), w, h, n=1,
                    warmup=1) / 1e6
            except Exception as err:  # the profiler is optional here; wall-clock stands
                print(f"(profiler timing unavailable: {err})")
        q = dequantize(gptq_quantize(w, h, name, cfg))
        r = dequantize(quantize_rtn(w, name))
        row["out_err_gptq"], row["out_err_rtn"] = out_err(q), out_err(r)
        results.append(row)
        print(f"{name:18s} hessian {t_hess:7.3f} s  gptq {t:7.3f} s  layer {t_hess + t:7.3f} s"
              + (f"  (gptq device {row['gptq_device_s']:.3f} s)" if "gptq_device_s" in row else "")
              + f"  |  out err gptq {row['out_err_gptq']:.4g} < rtn {row['out_err_rtn']:.4g}")
    print(json.dumps({"device": dev.device_kind, "experts": e, "k": k, "n": n,
                      "tokens": args.batches * args.batch, "top_k": args.top_k,
                      "act_order": args.act_order, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
