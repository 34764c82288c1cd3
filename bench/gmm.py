"""Grouped-GEMM benchmark: our Pallas kernels for every scheme beside XLA and torch, vs the floors.

``python -m bench.gmm [--models ...] [--tokens 32 1024 8192] [--schemes ...]``. For each model shape
of ``../shared/BENCHMARKS.md`` (one MoE layer's fused gate+up GEMM ``[T, K] x [E, K, N]``, ``T =
tokens * top_k``) and token count: Zipf-like routing with some empty experts, random normal data;
per scheme the kernel's device time from ``jax.profiler`` (``perf.timing``), a correctness check on
fresh data with the output memory poisoned first (NaN buffer freed just before the call, so an
unwritten tile shows as NaN), and the ratio to the floor ``max(weight bytes of active experts / 4.3
TB/s, FLOPs / rate)`` with rate 790 TFLOP/s (bf16, weight-only) or 1580 TOP/s (int8, fp8). Peers:
XLA ``lax.ragged_dot`` bf16, JAX's own Hopper Mosaic-GPU kernel
``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` (bf16, best of ``MOSAIC_CONFIGS``, jax.profiler)
and torch ``_grouped_mm`` bf16 when importable (CUDA events). tokamax is not on the GPU machine.
Writes ``gmm-<date>.json`` and ``gmm-<date>.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from mxmoe_jax.perf.predict import zipf_group_sizes
from mxmoe_jax.perf.shapes import PRESETS

# the fused gate+up GEMM of each model preset: name -> (E, K, N, top_k), N = 2 x moe_intermediate
MODELS = {name: (s.num_experts, s.hidden, 2 * s.moe_inter, s.top_k) for name, s in PRESETS.items()}
TOKENS = (32, 1024, 8192)
SCHEMES = ("w16a16", "w8a16_g-1_asym", "w4a16_g128_asym", "w4a16_g-1_sym", "w3a16_g128_asym",
           "w2a16_g128_asym", "w8a8_g-1_sym", "w8a8_g-1_fp8", "w4a4_g-1_sym", "w4a4_g128_sym")
HBM = 4.3e12  # B/s, measured device-to-device copy (BENCHMARKS.md)
RATE_BF16 = 790e12
RATE_INT8 = 1580e12
# relative-error tolerances of the sampled-row check, by activation format
TOL = {"a16": 1e-2, "a8": 2e-2, "fp8": 3e-2, "a4": 6e-2}


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def floor_us(weight_bytes: float, flops: float, int_mma: bool) -> float:
    return 1e6 * max(weight_bytes / HBM, flops / (RATE_INT8 if int_mma else RATE_BF16))


def _tol(scheme) -> float:
    if scheme.fp8:
        return TOL["fp8"]
    return TOL["a16" if scheme.weight_only else ("a4" if scheme.a_bits == 4 else "a8")]


def _torch_grouped_mm(x_np_shape, e, k, n, gs):
    """torch ``_grouped_mm`` bf16 time (CUDA events, median of 20) or None when unavailable."""
    try:
        import torch
    except ImportError:
        return None, "torch not importable"
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None, "torch without CUDA or _grouped_mm"
    try:
        t = x_np_shape[0]
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(e, n, k, device="cuda", dtype=torch.bfloat16).transpose(-2, -1)
        offs = torch.tensor(np.cumsum(gs), dtype=torch.int32, device="cuda")
        for _ in range(3):
            torch._grouped_mm(x, w, offs=offs)
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            torch._grouped_mm(x, w, offs=offs)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        del x, w
        torch.cuda.empty_cache()
        return float(np.median(times)), None
    except Exception as err:  # noqa: BLE001 - a peer failing must not stop the benchmark
        return None, f"{type(err).__name__}: {err}"[:200]


# JAX's own Hopper kernel (Pallas Mosaic GPU, persistent, TMA pipeline): (block_m, block_n,
# block_k, max_concurrent_steps, grid_block_n) configs tried, the best one is reported
MOSAIC_CONFIGS = ((128, 128, 64, 4, 1), (64, 128, 64, 4, 1))


def _jax_mosaic_ragged_dot(x, w_bf16, gs, reps):
    """Best device time of ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` or (None, why)."""
    import jax

    from mxmoe_jax.perf.timing import device_time_us

    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except ImportError as err:
        return None, f"not importable: {err}"[:200]
    if jax.devices()[0].device_kind.lower().find("h100") < 0 and \
            jax.devices()[0].device_kind.lower().find("h200") < 0:
        return None, "Hopper-only kernel"
    best, notes = None, []
    k, n = w_bf16.shape[1:]
    for bm, bn, bk, steps, gbn in MOSAIC_CONFIGS:
        if n % (bn * gbn) or k % bk:
            continue
        fn = jax.jit(lambda a, b, g, c=(bm, bn, bk, steps, gbn): ragged_dot_mgpu.ragged_dot(
            a, b, group_sizes=g, block_m=c[0], block_n=c[1], block_k=c[2],
            max_concurrent_steps=c[3], grid_block_n=c[4]))
        try:
            us = device_time_us(fn, x, w_bf16, gs, n=reps)
        except Exception as err:  # noqa: BLE001 - a peer failing must not stop the benchmark
            notes.append(f"{(bm, bn, bk, steps, gbn)}: {type(err).__name__}: {str(err)[:120]}")
            continue
        if best is None or us < best:
            best = us
    return best, ("; ".join(notes) or None)


def run(models, tokens_list, schemes, *, reps: int = 20, sweep: bool = False,
        detail: bool = False, with_peers: bool = True, extra_tiles=(), log=print):
    import jax
    import jax.numpy as jnp
    from jax import lax
    from mxmoe_jax.kernels.pallas import choose_tile, gmm

    from mxmoe_jax.ops import grouped_matmul_reference
    from mxmoe_jax.perf.timing import device_time_us
    from mxmoe_jax.quant import packing
    from mxmoe_jax.quant.rtn import quantize_rtn
    from mxmoe_jax.quant.scheme import QScheme

    rows, peers = [], []
    key = jax.random.key(0)
    for model in models:
        e, k, n, top_k = MODELS[model]
        key, kw = jax.random.split(key)
        w_f32 = jax.random.normal(kw, (e, k, n), jnp.float32)
        weights = {}
        for s_name in schemes:
            s = QScheme.parse(s_name)
            weights[s_name] = (w_f32.astype(jnp.bfloat16) if s.w_bits == 16
                               else packing.pack(quantize_rtn(w_f32, s)))
        del w_f32
        for tokens in tokens_list:
            gs_np = zipf_group_sizes(tokens, e, top_k, seed=tokens)
            t = int(gs_np.sum())
            active = int((gs_np > 0).sum())
            gs = jnp.asarray(gs_np)
            flops = 2.0 * t * k * n
            key, kx = jax.random.split(key)
            x = jax.random.normal(kx, (t, k), jnp.float32).astype(jnp.bfloat16)
            # peers
            t_rd, t_torch, torch_note = None, None, "not run (--no-peers)"
            if with_peers:
                rd = jax.jit(lambda a, b, g: lax.ragged_dot(a, b, g))
                w_bf16 = (weights["w16a16"] if "w16a16" in weights
                          else jnp.zeros((e, k, n), jnp.bfloat16))
                t_rd = device_time_us(rd, x, w_bf16, gs,
                                      n=max(3, reps // 4) if t > 4096 else reps)
                t_torch, torch_note = _torch_grouped_mm((t, k), e, k, n, gs_np)
                t_mosaic, mosaic_note = _jax_mosaic_ragged_dot(
                    x, w_bf16, gs, max(3, reps // 4) if t > 4096 else reps)
            else:
                t_mosaic, mosaic_note = None, "not run (--no-peers)"
            bf16_floor = floor_us(active * k * n * 2, flops, False)
            peers.append(dict(model=model, tokens=tokens, rows=t, active_experts=active,
                              ragged_dot_us=t_rd, torch_grouped_mm_us=t_torch,
                              torch_note=torch_note, mosaic_ragged_dot_us=t_mosaic,
                              mosaic_note=mosaic_note, floor_bf16_us=bf16_floor))
            log(f"{model} tokens={tokens} T={t} active={active}/{e}: ragged_dot {_f(t_rd)} us, "
                f"torch {_f(t_torch)} us, JAX Mosaic ragged_dot_mgpu {_f(t_mosaic)} us "
                f"({mosaic_note or 'ok'}), "
                f"bf16 floor {bf16_floor:.1f} us")
            for s_name in schemes:
                s = QScheme.parse(s_name)
                w = weights[s_name]
                per_expert = packing.nbytes_of(w) / e
                fl = floor_us(active * per_expert, flops, not s.weight_only)
                cands = [choose_tile(s, m=t, e=e, n=n, k=k)]
                if sweep:
                    cands += _sweep_candidates(s, t / e)
                cands += _matching_tiles(extra_tiles, s, t / e)
                best = None
                for tile in cands:
                    fn = jax.jit(lambda a, b, g, tile=tile: gmm(a, b, g, tile=tile))
                    try:
                        us = device_time_us(fn, x, w, gs, n=reps)
                    except Exception as err:  # noqa: BLE001 - record and continue
                        log(f"  {s_name} {tile}: FAILED {type(err).__name__}: {str(err)[:300]}")
                        continue
                    if len(cands) > 1:
                        log(f"    cand {us:9.1f} us  {tile}")
                    if best is None or us < best[0]:
                        best = (us, tile, fn)
                if best is None:
                    rows.append(dict(model=model, tokens=tokens, scheme=s_name, error="failed"))
                    continue
                path = "fused"
                if s.weight_only and s.w_bits != 16 and t / e >= 32:
                    # also the dequantize-first path (one pass to bf16, then the bf16 kernel)
                    fn_dq = jax.jit(lambda a, b, g: gmm(a, b, g, dequant_first=True))
                    us_dq = device_time_us(fn_dq, x, w, gs, n=reps)
                    log(f"    fused {best[0]:.1f} us, dequant-first {us_dq:.1f} us")
                    if us_dq < best[0]:
                        best = (us_dq, choose_tile("w16a16", m=t, e=e, n=n, k=k), fn_dq)
                        path = "dequant-first"
                us, tile, fn = best
                if detail:
                    _, by_name = device_time_us(fn, x, w, gs, n=reps, detail=True)
                    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
                    log("    detail: " + "; ".join(f"{k_[:40]} {v_:.1f}" for k_, v_ in top)
                        + f" ({len(by_name)} kernels)")
                err, finite = _check(fn, w, gs_np, e, k, n, s, key, grouped_matmul_reference)
                key, _ = jax.random.split(key)
                ok = finite and err <= _tol(s)
                row = dict(model=model, tokens=tokens, scheme=s_name, us=us, floor_us=fl,
                           x_floor=us / fl, weight_tbps=active * per_expert / us / 1e6,
                           rel_err=err, all_written=finite, ok=ok, tile=tile.as_dict(), path=path,
                           vs_torch=(us / t_torch) if t_torch else None)
                rows.append(row)
                log(f"  {s_name:18s} {us:9.1f} us  floor {fl:8.1f}  x{us / fl:5.2f}  "
                    f"{row['weight_tbps']:.2f} TB/s  err {err:.1e} {'ok' if ok else 'FAIL'}  "
                    f"{path} {tile}")
            del x
    return rows, peers


def _matching_tiles(entries, scheme, mpe):
    """Tiles of every ``--tiles`` entry (tile-table format) whose kind and bounds match."""
    from mxmoe_jax.kernels.pallas import TileConfig
    from mxmoe_jax.kernels.pallas.tuning import matches

    return [TileConfig(**en["tile"]) for en in entries if matches(en, scheme, mpe)]


def _sweep_candidates(scheme, mpe):
    from mxmoe_jax.kernels.pallas import TileConfig

    if mpe <= 16:
        return [TileConfig(bm=16, bn=bn, bk=bk, split_k=sk, num_warps=nw, num_stages=st)
                for bn, bk, sk, nw, st in [
                    (64, 128, 4, 4, 4), (128, 128, 4, 4, 3), (128, 128, 8, 4, 3),
                    (256, 128, 4, 8, 3), (64, 128, 8, 2, 4), (128, 256, 2, 4, 3),
                    (32, 128, 4, 2, 4), (128, 64, 16, 4, 4)]]
    if mpe <= 64:
        return [TileConfig(bm=bm, bn=bn, bk=bk, split_k=sk, num_warps=nw, num_stages=3)
                for bm, bn, bk, sk, nw in [(32, 128, 64, 4, 4), (64, 128, 64, 2, 4),
                                           (64, 256, 64, 1, 8), (16, 128, 128, 4, 4)]]
    return [TileConfig(bm=bm, bn=bn, bk=bk, split_k=1, num_warps=nw, num_stages=st)
            for bm, bn, bk, nw, st in [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                       (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                                       (128, 256, 128, 8, 3), (64, 256, 64, 4, 4)]]


def _check(fn, w, gs_np, e, k, n, s, key, reference):
    """Fresh random x, poisoned output memory; all rows finite; sampled rows vs the reference."""
    import jax
    import jax.numpy as jnp

    t = int(gs_np.sum())
    kx, _ = jax.random.split(jax.random.fold_in(key, 7))
    x = jax.random.normal(kx, (t, k), jnp.float32).astype(jnp.bfloat16)
    poison = jnp.full((t, n), jnp.nan, jnp.bfloat16).block_until_ready()
    poison.delete()
    out = fn(x, w, jnp.asarray(gs_np)).block_until_ready()
    finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    # sampled rows: first, last and a middle row of up to 16 non-empty experts
    ends = np.cumsum(gs_np)
    starts = ends - gs_np
    nz = np.flatnonzero(gs_np)
    pick = nz[np.linspace(0, len(nz) - 1, min(16, len(nz))).round().astype(int)]
    rows, sub = [], np.zeros(e, np.int32)
    for ex in pick:
        r = sorted({starts[ex], (starts[ex] + ends[ex] - 1) // 2, ends[ex] - 1})
        rows += r
        sub[ex] = len(r)
    rows = np.asarray(rows)
    ref = reference(x[rows], w, jnp.asarray(sub)).astype(jnp.float32)
    got = out[rows].astype(jnp.float32)
    err = float(jnp.linalg.norm(got - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))
    return err, finite


def table(rows, peers) -> str:
    lines = ["| model | tokens | scheme | µs | floor µs | × floor | weight TB/s | vs torch bf16 "
             "| ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in peers:
        tt = p["torch_grouped_mm_us"]
        rd = p["ragged_dot_us"]
        lines.append(f"| {p['model']} | {p['tokens']} | XLA ragged_dot bf16 | "
                     f"{_f(rd)} | {p['floor_bf16_us']:.1f} | "
                     f"{'' if rd is None else f'{rd / p['floor_bf16_us']:.2f}'} | | | |")
        mo = p.get("mosaic_ragged_dot_us")
        lines.append(f"| {p['model']} | {p['tokens']} | JAX Mosaic ragged_dot_mgpu bf16 | "
                     f"{_f(mo)} | {p['floor_bf16_us']:.1f} | "
                     f"{'' if mo is None else f'{mo / p['floor_bf16_us']:.2f}'} | | | |")
        lines.append(f"| {p['model']} | {p['tokens']} | torch _grouped_mm bf16 | "
                     f"{'n/a' if tt is None else f'{tt:.1f}'} | {p['floor_bf16_us']:.1f} | "
                     f"{'' if tt is None else f'{tt / p['floor_bf16_us']:.2f}'} | | | |")
        for r in rows:
            if r["model"] != p["model"] or r["tokens"] != p["tokens"] or "us" not in r:
                continue
            vt = "" if r["vs_torch"] is None else f"{r['vs_torch']:.2f}"
            lines.append(f"| {r['model']} | {r['tokens']} | {r['scheme']} | {r['us']:.1f} | "
                         f"{r['floor_us']:.1f} | {r['x_floor']:.2f} | {r['weight_tbps']:.2f} | "
                         f"{vt} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """One panel per model: device time per scheme and peer against tokens (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({p["model"] for p in result["peers"]}, key=list(MODELS).index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=False):
        ps = [p for p in result["peers"] if p["model"] == model]
        tok = [p["tokens"] for p in ps]
        ax.plot(tok, [p["ragged_dot_us"] or np.nan for p in ps], "k:", label="XLA ragged_dot")
        if any(p.get("mosaic_ragged_dot_us") for p in ps):
            ax.plot(tok, [p.get("mosaic_ragged_dot_us") or np.nan for p in ps], "k-.",
                    label="JAX Mosaic ragged_dot_mgpu")
        if any(p["torch_grouped_mm_us"] for p in ps):
            ax.plot(tok, [p["torch_grouped_mm_us"] or np.nan for p in ps], "k--",
                    label="torch _grouped_mm")
        ax.plot(tok, [p["floor_bf16_us"] for p in ps], color="0.7", lw=4, alpha=0.5,
                label="bf16 floor")
        for s in result["schemes"]:
            rs = [r for r in result["rows"] if r["model"] == model and r["scheme"] == s
                  and "us" in r]
            ax.plot([r["tokens"] for r in rs], [r["us"] for r in rs], marker="o", label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_xlabel("tokens")
        ax.set_ylabel("device µs")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle(f"grouped GEMM, {result['device']}, JAX {result['jax']}, {result['date']}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m bench.gmm", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--reps", type=int, default=20, help="traced calls per timing")
    p.add_argument("--sweep", action="store_true", help="also try a few tile configs per row")
    p.add_argument("--detail", action="store_true", help="print per-kernel device time")
    p.add_argument("--no-peers", action="store_true", help="skip XLA and torch")
    p.add_argument("--tiles", type=Path, default=None,
                   help="JSON list of extra candidate tiles, tile-table entry format "
                        "(kind, min/max_m_per_expert, tile); each matching one is timed too")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tag", default="", help="suffix of the result file names")
    return p


def main(args) -> int:
    import jax

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        raise ValueError("bench gmm: needs an NVIDIA GPU (the kernels compile with Triton)")
    t0 = time.time()
    extra = json.loads(args.tiles.read_text()) if args.tiles else []
    rows, peers = run(args.models, args.tokens, args.schemes, reps=args.reps, sweep=args.sweep,
                      detail=args.detail, with_peers=not args.no_peers, extra_tiles=extra,
                      log=lambda s: print(s, flush=True))
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H%MZ")
    result = dict(date=date, device=dev.device_kind, jax=jax.__version__,
                  schemes=list(args.schemes), rows=rows, peers=peers,
                  tokamax="not installed on the GPU machine", seconds=time.time() - t0)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gmm-{date}{'-' + args.tag if args.tag else ''}"
    path = args.out / f"{stem}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    try:
        plot(result, args.out / f"{stem}.png")
    except ImportError:
        print("matplotlib not importable: no PNG", file=sys.stderr)
    print(table(rows, peers))
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    """``mxmoe-jax bench gmm``."""
    bench = subparsers.add_parser("bench", help="benchmarks (kernels)")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser("gmm", help="grouped-GEMM kernels vs peers and floors (GPU)")
    build_parser(p)
    p.set_defaults(func=main)


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
