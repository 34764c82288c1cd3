"""What the compiled kernels do on the GPU: Nsight Compute counters per grouped-GEMM kernel.

``python -m bench.inspect_kernels --out FILE [--cases NAME ...]`` runs each case (one grouped GEMM
of a Qwen1.5-MoE layer, ``bench.gmm`` shapes and Zipf routing; the tile from the tuned table unless
the case overrides it) under ``ncu --clock-control none`` and tabulates, per kernel: duration,
registers per thread, achieved occupancy, tensor-pipe instructions by kind (``gmma`` = Hopper
wgmma, ``hmma``/``imma`` = float/integer MMA; wgmma counts under both ``gmma`` and its type),
shared-memory loads and stores, and SM / DRAM throughput. Writes the raw ncu text to ``FILE`` and
prints a Markdown table. Needs ncu with hardware counters (Firecracker GPU machines).

(XLA keeps Triton kernels' PTX to itself in JAX 0.11: ``--xla_dump_to`` writes HLO and MLIR but no
PTX, so the counters are how we see whether, e.g., FP8 dots reached wgmma.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# name: (scheme, tokens, tile overrides or None for tuning.choose_tile)
CASES = {
    "bf16-8192": ("w16a16", 8192, None),
    "bf16-32": ("w16a16", 32, None),
    "w4a16-32": ("w4a16_g128_asym", 32, None),
    "w4a16-32-noswap": ("w4a16_g128_asym", 32, dict(swap_ab=False, split_k=16, num_stages=4)),
    "w8a8-8192": ("w8a8_g-1_sym", 8192, None),
    "fp8-8192": ("w8a8_g-1_fp8", 8192, None),
    "w4a4-8192": ("w4a4_g-1_sym", 8192, None),
    "w4a4-8192-noswap": ("w4a4_g-1_sym", 8192,
                         dict(swap_ab=False, bm=128, bn=128, num_warps=8, num_stages=3)),
}
METRICS = {
    "us": "gpu__time_duration.sum",
    "regs": "launch__registers_per_thread",
    "occupancy %": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "gmma": "sm__inst_executed_pipe_tensor_op_gmma.sum",
    "hmma": "sm__inst_executed_pipe_tensor_op_hmma.sum",
    "imma": "sm__inst_executed_pipe_tensor_op_imma.sum",
    "lds": "smsp__inst_executed_op_shared_ld.sum",
    "sts": "smsp__inst_executed_op_shared_st.sum",
    "SM %": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "DRAM %": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
}


def compile_cases(names: list[str]) -> dict[str, str]:
    """Compile and run each case once; returns ``{case: tile}`` (the dump holds the PTX)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from mxmoe_jax.kernels.pallas import choose_tile, gmm

    from bench.gmm import MODELS, zipf_group_sizes
    from mxmoe_jax.quant import packing
    from mxmoe_jax.quant.rtn import quantize_rtn
    from mxmoe_jax.quant.scheme import QScheme

    e, k, n, top_k = MODELS["qwen1.5-moe"]
    w_f32 = jax.random.normal(jax.random.key(0), (e, k, n), jnp.float32)
    tiles = {}
    for name in names:
        scheme, tokens, over = CASES[name]
        s = QScheme.parse(scheme)
        w = w_f32.astype(jnp.bfloat16) if s.w_bits == 16 else packing.pack(quantize_rtn(w_f32, s))
        gs_np = zipf_group_sizes(tokens, e, top_k, seed=tokens)
        t = int(gs_np.sum())
        x = jax.random.normal(jax.random.key(1), (t, k), jnp.float32).astype(jnp.bfloat16)
        tile = choose_tile(s, m=t, e=e, n=n, k=k)
        if over:
            tile = dataclasses.replace(tile, **over)
        fn = jax.jit(lambda a, b, g, tile=tile: gmm(a, b, g, tile=tile, dequant_first=False))
        jax.block_until_ready(fn(x, w, jnp.asarray(gs_np)))
        tiles[name] = str(tile)
        print(f"compiled {name}: {tile}", flush=True)
    return tiles


def parse(text: str) -> list[dict]:
    """One dict per profiled kernel: name plus the ``METRICS`` values found in ncu's text."""
    rows, cur = [], None
    by_metric = {v: k for k, v in METRICS.items()}
    for line in text.splitlines():
        m = re.match(r"\s+(gmm_\w+) \(", line)
        if m:
            cur = {"kernel": m.group(1)}
            rows.append(cur)
            continue
        parts = line.split()
        if cur is not None and len(parts) >= 2 and parts[0] in by_metric:
            cur[by_metric[parts[0]]] = parts[-1].replace(",", "")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inspect_kernels",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="file for ncu's raw output")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--run-cases", action="store_true", help=argparse.SUPPRESS)  # ncu's child
    args = p.parse_args(argv)
    if args.run_cases:
        compile_cases(args.cases)
        return 0
    ncu = shutil.which("ncu")
    if ncu is None:
        raise SystemExit("inspect_kernels: needs Nsight Compute (ncu) on PATH and a GPU")
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "-k", "regex:gmm_w",
           "--metrics", ",".join(METRICS.values()),
           sys.executable, "-m", "bench.inspect_kernels", "--out", str(args.out), "--run-cases",
           "--cases", *args.cases]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    text = r.stdout + r.stderr
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("# " + " ".join(cmd[:-len(args.cases) - 3]) + " ...\n" + text)
    os.replace(tmp, args.out)
    rows = parse(text)
    if r.returncode or not rows:
        print(text[-2000:])
        raise SystemExit(f"inspect_kernels: ncu exited {r.returncode} with {len(rows)} kernels")
    cols = list(METRICS)
    print("| case | kernel | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for case, row in zip(args.cases, rows, strict=False):
        print(f"| {case} | {row['kernel']} | " + " | ".join(row.get(c, "") for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
