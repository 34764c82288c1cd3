"""Mixed-precision MoE layers: the one-launch kernel vs per-scheme launches, and whole layers vs
bf16 in XLA and torch.

``python -m bench.mixed_layer [--models ...] [--tokens 32 1024 8192] [--reps 20]``. For each model
shape of ``../shared/BENCHMARKS.md`` (``mxmoe_jax.perf.shapes.PRESETS``) and token count, with
Zipf-like routing (``bench.gmm.zipf_group_sizes``) and random normal data:

* **GEMM** (the fused gate_up ``[T*k, D] x [E, D, 2I]``): each mix (``MIXES``; experts ranked by
  tokens, the hottest get the first scheme) as ONE launch (``kernels.pallas.mixed_gemm``) and as
  one launch per scheme (``ops.grouped_matmul_by_scheme(launch="per_scheme")``), beside the
  uniform schemes of the mixes and bf16 (``gmm``). The two mixed paths must agree, and at the
  smallest token count both are checked against the reference (dequantized f32 math).
* **Layer** (router, sort, gate_up with SiLU·up in the epilogue, down, combine, shared expert):
  bf16 in XLA (``kernel_mode("reference")``: ``lax.ragged_dot``), bf16 on our kernels, uniform
  w8a8 / fp8 / w4a16 and the mixes on our kernels, and torch bf16 (``torch.sort`` +
  ``_grouped_mm`` + SiLU + ``index_add_``, CUDA events) where torch imports.

Device time from ``jax.profiler`` (``perf.timing``). Writes
``bench/results/mixed_layer-<date>.json``
and prints a table. ``--interpret --small`` runs every path once on small shapes in Pallas
interpret mode without times (a CPU check of the program itself).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.gmm import zipf_group_sizes
from mxmoe_jax.perf.shapes import PRESETS, MoEShapes

TOKENS = (32, 1024, 8192)
# mixes: schemes from the hottest experts (most tokens) to the coldest, in equal expert shares
# except w5a5 (a quarter w8a8, three quarters w4a4: 5 bits, the paper's W5A5 from {w4a4, w8a8})
MIXES = {
    "w5a5": (("w8a8_g-1_sym", 0.25), ("w4a4_g-1_sym", 0.75)),
    "w2.5a16": (("w3a16_g128_asym", 0.5), ("w2a16_g128_asym", 0.5)),
    "mix4": (("w8a8_g-1_sym", 0.25), ("w4a16_g128_asym", 0.25), ("w4a4_g-1_sym", 0.25),
             ("w2a16_g128_asym", 0.25)),
}
LAYER_UNIFORM = ("w8a8_g-1_sym", "w8a8_g-1_fp8", "w4a16_g128_asym")
SMALL = MoEShapes(name="small", hidden=256, moe_inter=128, num_experts=8, top_k=2,
                  shared_inter=256)
TOL = 6e-2  # a4 activations (bench.gmm's table); the mixed paths agree far closer


def assignment_of(gs: np.ndarray, mix) -> tuple[int, ...]:
    """Expert -> index into the mix's schemes, hottest experts first."""
    e = len(gs)
    rank = np.argsort(-gs, kind="stable")
    out = np.zeros(e, np.int32)
    bounds = np.cumsum([share for _, share in mix])
    for r, ex in enumerate(rank):
        out[ex] = int(np.searchsorted(bounds, (r + 0.5) / e))
    for i in range(len(mix)):  # every scheme keeps at least one expert
        if not (out == i).any():
            out[rank[min(i, e - 1)]] = i
    return tuple(int(a) for a in out)


_T0 = time.perf_counter()


def _add(rows, row) -> None:
    """Append a row and print it at once (with seconds since start), so a killed run leaves its
    finished rows in the log."""
    rows.append(row)
    t = time.perf_counter() - _T0
    print(f"[{t:7.1f}s] {json.dumps(row)}", flush=True)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _timer(interpret: bool, reps: int):
    if interpret:
        return lambda fn, *a: None
    from mxmoe_jax.perf.timing import device_time_us

    return lambda fn, *a: round(float(device_time_us(fn, *a, n=reps)), 1)


def _detail_timer(interpret: bool, reps: int):
    """``fn, *args -> (device us, {kernel: us per call})`` from ONE trace (where a mixed call's
    time goes), or ``(None, None)`` in interpret mode."""
    if interpret:
        return lambda fn, *a: (None, None)
    from mxmoe_jax.perf.timing import device_time_us

    def timed(fn, *args):
        total, by_name = device_time_us(fn, *args, n=reps, detail=True)
        return round(float(total), 1), {k: round(float(v), 2) for k, v in
                                        sorted(by_name.items(), key=lambda kv: -kv[1])}
    return timed


def stacks_for(w, assignment, schemes):
    """The packed (or bf16) stacks of ``w [E, K, N]`` f32 for an assignment over ``schemes``."""
    import jax.numpy as jnp

    from mxmoe_jax.quant.packing import pack
    from mxmoe_jax.quant.rtn import quantize_rtn
    from mxmoe_jax.quant.scheme import W16A16, QScheme

    out = []
    for i, name in enumerate(schemes):
        idx = np.asarray([e for e, a in enumerate(assignment) if a == i])
        s = QScheme.parse(name).for_k(w.shape[1])
        out.append((w[idx].astype(jnp.bfloat16) if s == W16A16 else pack(quantize_rtn(w[idx], s)),
                    [int(e) for e in idx]))
    return out


def gemm_rows(shape: MoEShapes, tokens: int, *, interpret: bool, reps: int, seed: int):
    import jax
    import jax.numpy as jnp
    from mxmoe_jax.kernels.pallas import gmm, mixed_grouped_matmul

    from mxmoe_jax import ops

    timed = _timer(interpret, reps)
    timed_detail = _detail_timer(interpret, reps)
    e, d, n = shape.num_experts, shape.hidden, 2 * shape.moe_inter
    gs_np = zipf_group_sizes(tokens, e, shape.top_k, seed=seed)
    gs = jnp.asarray(gs_np)
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (tokens * shape.top_k, d), jnp.float32).astype(jnp.bfloat16)
    w = 0.02 * jax.random.normal(kw, (e, d, n), jnp.float32)
    impl = "interpret" if interpret else "kernel"
    rows = []
    base = dict(model=shape.name, tokens=tokens, level="gemm")
    uniform = sorted({s for mix in MIXES.values() for s, _ in mix} | {"w16a16"})
    for name in uniform:
        ((wq, _),) = stacks_for(w, (0,) * e, [name])
        f = jax.jit(functools.partial(gmm, interpret=interpret))  # weights as arguments
        jax.block_until_ready(f(x, wq, gs))
        _add(rows, dict(base, variant=name, path="uniform", us=timed(f, x, wq, gs)))
    for mix_name, mix in MIXES.items():
        assignment = assignment_of(gs_np, mix)
        parts = stacks_for(w, assignment, [s for s, _ in mix])
        stacks = [wq for wq, _ in parts]
        ids = [ex for _, ex in parts]
        one = jax.jit(lambda v, ws, g, a=assignment: mixed_grouped_matmul(
            v, ws, g, a, interpret=interpret))
        per = jax.jit(lambda v, ws, g, ids=ids: ops.grouped_matmul_by_scheme(
            v, list(zip(ws, ids, strict=True)), g, impl=impl, launch="per_scheme"))
        y1 = np.asarray(one(x, stacks, gs), np.float32)
        y2 = np.asarray(per(x, stacks, gs), np.float32)
        check = dict(one_vs_per=_rel(y1, y2))
        if tokens == min(TOKENS) or interpret:
            ref = np.asarray(ops._by_scheme_reference(x, parts, gs, jnp.float32), np.float32)
            check.update(one_vs_ref=_rel(y1, ref), per_vs_ref=_rel(y2, ref))
        ok = bool(all(v < TOL for v in check.values()) and np.isfinite(y1).all())
        for path, fn in (("one_launch", one), ("per_scheme", per)):
            us, kernels = timed_detail(fn, x, stacks, gs)
            _add(rows, dict(base, variant=mix_name, path=path, us=us, ok=ok, **check,
                            kernels=kernels))
    return rows


def _block(shape: MoEShapes, seed: int):
    import jax.numpy as jnp
    from flax import nnx

    from bench.model_layer import qwen_moe_config

    cfg = qwen_moe_config(dict(hidden=shape.hidden, experts=shape.num_experts, topk=shape.top_k,
                               inter=shape.moe_inter, shared=shape.shared_inter),
                          shared=shape.shared_inter > 0)
    from mxmoe_jax.models.moe import MoEBlock

    return cfg, MoEBlock(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))


def layer_rows(shape: MoEShapes, tokens: int, *, interpret: bool, reps: int, seed: int):
    import jax
    import jax.numpy as jnp

    from mxmoe_jax import ops
    from mxmoe_jax.eval.bench_cli import stack_values, uniform_weights
    from mxmoe_jax.models.moe import ExpertWeights, SchemeGroup, jitted_moe_forward, route
    from mxmoe_jax.quant.scheme import QScheme

    timed = _timer(interpret, reps)
    cfg, block = _block(shape, seed)
    x = jax.random.normal(jax.random.key(seed + tokens), (tokens, shape.hidden),
                          jnp.float32).astype(jnp.bfloat16)
    vals = stack_values(block.experts.weights())
    # routing of these tokens, for the mixes' hot/cold ranks
    idx, _ = route(block.router_logits(x), cfg)
    gs_np = np.bincount(np.asarray(idx).ravel(), minlength=shape.num_experts)
    variants = {"bf16": None}
    variants |= {s: uniform_weights(vals, QScheme.parse(s)) for s in LAYER_UNIFORM}
    for mix_name, mix in MIXES.items():
        assignment = assignment_of(gs_np, mix)
        groups = {}
        for proj, v in vals.items():
            groups[proj] = tuple(SchemeGroup(w=wq, experts=tuple(ex), scheme=QScheme.parse(
                mix[i][0]).for_k(v.shape[1])) for i, (wq, ex) in enumerate(
                stacks_for(v, assignment, [s for s, _ in mix])))
        variants[mix_name] = ExpertWeights(gate_up=groups["gate_up"], down=groups["down"],
                                           num_experts=shape.num_experts)
    rows = []
    base = dict(model=shape.name, tokens=tokens, level="layer")
    impl = "interpret" if interpret else "kernel"
    f, state = jitted_moe_forward(block)  # weights as arguments, not compiled-in constants
    with ops.kernel_mode("reference"):
        ref = np.asarray(f(x, state), np.float32)
        _add(rows, dict(base, variant="bf16", path="xla", us=timed(f, x, state)))
    for name, routed in variants.items():
        with ops.kernel_mode(impl):
            y = np.asarray(f(x, state, routed), np.float32)
            _add(rows, dict(base, variant=name, path="ours", us=timed(f, x, state, routed),
                             rel_to_bf16=_rel(y, ref), finite=bool(np.isfinite(y).all())))
    if not interpret:
        us, why = torch_layer_us(shape, tokens, gs_np)
        _add(rows, dict(base, variant="bf16", path="torch", us=us, note=why))
    return rows


def torch_layer_us(shape: MoEShapes, tokens: int, gs_np):
    """torch bf16 layer (sort, ``_grouped_mm`` gate_up, SiLU·up, ``_grouped_mm`` down,
    weighted ``index_add_``; router and shared expert as dense matmuls): median CUDA-event us."""
    try:
        import torch
    except ImportError:
        return None, "torch not importable"
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None, "torch without CUDA or _grouped_mm"
    dev, bf = "cuda", torch.bfloat16
    e, d, i, k = shape.num_experts, shape.hidden, shape.moe_inter, shape.top_k
    x = torch.randn(tokens, d, device=dev, dtype=bf)
    wr = torch.randn(d, e, device=dev, dtype=bf) * 0.02
    wgu = (torch.randn(e, 2 * i, d, device=dev, dtype=bf) * 0.02).transpose(-2, -1)
    wd = (torch.randn(e, d, i, device=dev, dtype=bf) * 0.02).transpose(-2, -1)
    si = shape.shared_inter
    ws = [torch.randn(d, 2 * si, device=dev, dtype=bf) * 0.02,
          torch.randn(si, d, device=dev, dtype=bf) * 0.02] if si else None

    def layer():
        probs = torch.softmax((x @ wr).float(), dim=-1)
        w, idx = torch.topk(probs, k, dim=-1)
        flat = idx.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        token = order // k
        counts = torch.bincount(flat, minlength=e)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gu = torch._grouped_mm(x[token], wgu, offs=offs)
        h = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
        y = torch._grouped_mm(h, wd, offs=offs)
        out = torch.zeros(tokens, d, device=dev, dtype=torch.float32)
        out.index_add_(0, token, y.float() * w.reshape(-1)[order, None])
        if ws is not None:
            g = x @ ws[0]
            out += (torch.nn.functional.silu(g[:, :si]) * g[:, si:]) @ ws[1]
        return out

    try:
        for _ in range(3):
            layer()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            layer()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return round(float(np.median(times)), 1), None
    except Exception as err:  # noqa: BLE001 - a peer failing must not stop the benchmark
        return None, f"{type(err).__name__}: {err}"[:200]


def table(rows) -> str:
    lines = ["| model | tokens | level | variant | path | us | check |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        us = "n/a" if r.get("us") is None else f"{r['us']:.1f}"
        chk = "; ".join(f"{k}={r[k]:.1e}" for k in ("one_vs_per", "one_vs_ref", "rel_to_bf16")
                        if k in r)
        lines.append(f"| {r['model']} | {r['tokens']} | {r['level']} | {r['variant']} | "
                     f"{r['path']} | {us} | {chk} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mixed_layer", description=__doc__)
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--levels", nargs="+", default=["gemm", "layer"], choices=["gemm", "layer"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode, no times")
    p.add_argument("--small", action="store_true", help="one small shape instead of --models")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    import jax

    if not args.interpret and jax.devices()[0].platform != "gpu":
        print("bench.mixed_layer: needs an NVIDIA GPU (or --interpret --small)", file=sys.stderr)
        return 2
    shapes = [SMALL] if args.small else [PRESETS[m] for m in args.models]
    rows = []
    for shape in shapes:
        for t in args.tokens:
            if "gemm" in args.levels:
                rows += gemm_rows(shape, t, interpret=args.interpret, reps=args.reps,
                                  seed=args.seed)
            if "layer" in args.levels:
                rows += layer_rows(shape, t, interpret=args.interpret, reps=args.reps,
                                   seed=args.seed)
            print(table([r for r in rows if r["model"] == shape.name and r["tokens"] == t]),
                  flush=True)
    dev = jax.devices()[0]
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H%MZ")
    doc = dict(date=stamp, device=dev.device_kind, jax=jax.__version__,
               interpret=args.interpret, mixes={k: list(v) for k, v in MIXES.items()}, rows=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-interpret" if args.interpret else ""
    if not args.small and len(shapes) < len(PRESETS):  # one file per subset run
        suffix = "-" + "-".join(s.name for s in shapes) + suffix
    path = args.out / f"mixed_layer-{stamp}{suffix}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    print(table(rows))
    print(f"wrote {path}")
    bad = [r for r in rows if r.get("ok") is False or r.get("finite") is False]
    if bad:
        print(f"CHECK FAILED in {len(bad)} rows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
