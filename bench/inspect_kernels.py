"""What the GPU machine's own compiler makes of our kernels: instruction mix, registers per kernel.

``python -m bench.inspect_kernels --out DIR [--cases NAME ...]`` compiles each case (one grouped
GEMM of a Qwen1.5-MoE layer, ``bench.gmm`` shapes) with XLA's dump on, so the PTX that XLA's
bundled Triton produced is written to ``DIR/dump``. It then splits the PTX per ``.entry``, counts
the instruction classes that decide grouped-GEMM speed (``wgmma`` by operand type and operand
source, ``mma.sync``, shared-memory loads/stores, ``ldmatrix``, ``cp.async``, TMA
``cp.async.bulk``, converts, ``prmt``/``lop3``) and runs ``ptxas -v`` (when on PATH) for
registers and spills. Writes ``DIR/kernels.json`` and prints a table.

Offline compiles (pip Triton) are only a proxy: this reads what actually runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# name: (scheme, tokens, tile overrides or None for tuning.choose_tile)
CASES = {
    "bf16-8192": ("w16a16", 8192, None),
    "bf16-32": ("w16a16", 32, None),
    "w4a16-32": ("w4a16_g128_asym", 32, None),
    "w4a16-32-swap": ("w4a16_g128_asym", 32, dict(swap_ab=True)),
    "w8a8-8192": ("w8a8_g-1_sym", 8192, None),
    "fp8-8192": ("w8a8_g-1_fp8", 8192, None),
    "w4a4-8192": ("w4a4_g-1_sym", 8192, None),
    "w4a4-8192-swap": ("w4a4_g-1_sym", 8192, dict(swap_ab=True)),
}
PATTERNS = {
    "wgmma": r"wgmma\.mma_async\S*",
    "mma.sync": r"mma\.sync\S*",
    "ld.shared": r"ld\.shared\S*",
    "st.shared": r"st\.shared\S*",
    "ldmatrix": r"ldmatrix\S*",
    "cp.async": r"cp\.async\.c[ag]\S*",
    "tma": r"cp\.async\.bulk\S*",
    "cvt": r"cvt\.\S*",
    "prmt": r"prmt\.\S*",
    "lop3": r"lop3\.\S*",
    "bar": r"bar\.sync|barrier\.sync\S*",
}


def split_entries(ptx: str) -> dict[str, str]:
    """``{kernel name: body}`` of every ``.entry`` in a PTX module."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx):
        start = m.start()
        nxt = ptx.find(".entry", m.end())
        out[m.group(1)] = ptx[start: nxt if nxt != -1 else len(ptx)]
    return out


def count(body: str) -> dict:
    res = {}
    for key, pat in PATTERNS.items():
        found = re.findall(pat, body)
        res[key] = len(found)
        if key in ("wgmma", "mma.sync", "cvt") and found:
            kinds: dict[str, int] = {}
            for f in found:
                kinds[f] = kinds.get(f, 0) + 1
            res[key + "_kinds"] = kinds
    # wgmma whose A operand is a register list (``{d}, {a}, desc_b``), not a smem descriptor
    a_regs = 0
    for line in re.findall(r"wgmma\.mma_async[^;]*;", body, flags=re.S):
        a_regs += line.count("{") >= 2
    res["wgmma_a_from_registers"] = a_regs
    return res


def ptxas_registers(ptx_path: Path) -> dict[str, dict]:
    """``{kernel: {"regs": n, "spill_stores": b, "spill_loads": b}}`` from ``ptxas -v``."""
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return {}
    text = ptx_path.read_text()
    target = re.search(r"\.target\s+(\w+)", text)
    arch = target.group(1) if target else "sm_90a"
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([ptxas, f"-arch={arch}", "-v", str(ptx_path), "-o",
                            os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                           timeout=300)
    out, cur = {}, None
    for line in (r.stdout + r.stderr).splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line) or \
            re.search(r"Function properties for (\w+)", line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, {})
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            out[cur]["spill_stores"], out[cur]["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            out[cur]["regs"] = int(m.group(1))
    if r.returncode and not out:
        out["_error"] = {"ptxas": (r.stderr or r.stdout)[-300:]}
    return out


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inspect_kernels",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args(argv)
    dump = args.out / "dump"
    dump.mkdir(parents=True, exist_ok=True)
    # must be set before JAX initialises its GPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}").strip()
    import jax

    if jax.devices()[0].platform != "gpu":
        raise SystemExit("inspect_kernels: needs an NVIDIA GPU (it reads XLA's compiled Triton)")
    tiles = compile_cases(args.cases)
    kernels = {}
    for ptx_path in sorted(dump.glob("*.ptx")):
        entries = {k: v for k, v in split_entries(ptx_path.read_text()).items() if "gmm_" in k}
        if not entries:
            continue
        regs = ptxas_registers(ptx_path)
        for name, body in entries.items():
            kernels[f"{ptx_path.name}:{name}"] = dict(kernel=name, module=ptx_path.name,
                                                      **count(body), **regs.get(name, {}))
    result = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, tiles=tiles,
                  kernels=kernels)
    tmp = args.out / "kernels.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out / "kernels.json")
    cols = ["regs", "wgmma", "wgmma_a_from_registers", "mma.sync", "ld.shared", "st.shared",
            "ldmatrix", "cp.async", "tma", "cvt", "prmt", "lop3"]
    print("| kernel | module | " + " | ".join(cols) + " |")
    for v in kernels.values():
        print(f"| {v['kernel']} | {v['module'][:40]} | "
              + " | ".join(str(v.get(c, "")) for c in cols) + " |")
    for v in kernels.values():
        kinds = {k: v[k] for k in ("wgmma_kinds", "mma.sync_kinds") if k in v}
        print(v["kernel"], json.dumps(kinds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
