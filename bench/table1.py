"""The README's "Results" table, shaped like the paper's Table 1, on ``qwen2moe-tiny-books``.

Rows: FP; RTN and GPTQ uniform w4/w3/w2 (per channel and g64, the grouped size that divides both
K = 256 and K = 192), each with its true bits; MxMoE (GPTQ losses, r = 1) at each of those bits;
uniform w8a8 and w4a4 with rotation, MxMoE W5A5 (r = 0.75) with rotation; linear-block vs
expert granularity at the lowest budget that leaves the solver a choice (uniform w2 g64's 2.5
bits: at w2 per channel's bits every block must take that scheme). Perplexity on books-eval and
WikiText-2 (16 windows of 512 tokens each), GPTQ calibrated on books-calib (16 x 512, seed 42).

Run: ``python -m bench.table1 [--work DIR] [--proxy squared] [--mode model]`` (shares the
measurement cache and setup of `bench.proxy_study`); prints a Markdown table and writes
``bench/results/table1-<date>-cpu.json``.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from bench.proxy_study import (
    SCHEMES,
    SHARED,
    Lab,
    avg_bits,
    run_cli,
    setup,
    solve_r1,
    study_args,
    study_inputs,
    transform,
)
from bench.proxy_study import uniform as uniform_layers

WA_SCHEMES = ("w4a4_g-1_sym", "w8a8_g-1_sym")


def _transform_for(proxy: str):
    return (lambda d, layer: d) if proxy == "frobenius" else (lambda d, layer: d ** 2)


def setup_rotated(work: Path, calib: Path) -> None:
    """GPTQ losses of the weight-activation schemes on the Hadamard-rotated model, and perf."""
    if not (work / "loss-wa.json").exists():
        run_cli(["calibrate", "--model", str(work / "model"), "--text", str(calib), "--method",
              "gptq", "--hadamard", "--seqlen", "512", "--nsamples", "16", "--schemes",
              *WA_SCHEMES, "--out", str(work / "loss-wa.json")])
    if not (work / "perf-wa.json").exists():
        run_cli(["profile", "--analytic", "H200", "--shapes", str(work / "model"), "--schemes",
              "w16a16", *WA_SCHEMES, "--out", str(work / "perf-wa.json")])


def main(argv: list[str] | None = None) -> int:
    p = study_args(__doc__)
    p.add_argument("--wiki", type=Path,
                   default=SHARED / "data" / "wikitext2" / "wiki.test.raw.txt")
    p.add_argument("--proxy", default="squared", choices=("frobenius", "squared"))
    p.add_argument("--mode", default="model", choices=("layer", "model"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    setup(args.work, args.model, args.calib, args.eval)
    lab = Lab(args.work, args.calib, args.eval, args.windows)
    inputs = study_inputs(args.work)
    wiki = {"wikitext2": args.wiki}
    rows = []

    def row(label, bits, layers, **kw):
        rec = lab.measure(label, layers, extra=wiki, **kw)
        rows.append(dict(label=label, wbits=bits, books=rec["ppl"],
                         wiki=rec["ppl_by"]["wikitext2"]))

    row("FP (w16a16)", 16.0, uniform_layers(inputs, "w16a16"))
    for w in ("w4", "w3", "w2"):
        for g in ("g-1", "g64"):
            s = f"{w}a16_{g}_asym"
            bits = avg_bits(inputs, uniform_layers(inputs, s))
            row(f"RTN {s}", bits, uniform_layers(inputs, s), method="rtn")
            row(f"GPTQ {s}", bits, uniform_layers(inputs, s))
            mixed = solve_r1(transform(inputs, _transform_for(args.proxy)), bits, args.mode)
            row(f"MxMoE GPTQ @ {bits:.3f} ({args.proxy}, {args.mode})", avg_bits(inputs, mixed),
                mixed)
    low = avg_bits(inputs, uniform_layers(inputs, SCHEMES[1]))  # w2a16_g64_asym
    expert = solve_r1(transform(inputs, _transform_for(args.proxy)), low, args.mode, "expert")
    row(f"MxMoE GPTQ @ {low:.3f}, expert granularity", avg_bits(inputs, expert), expert)

    setup_rotated(args.work, args.calib)
    for s in WA_SCHEMES:
        layers = uniform_layers(inputs, s)
        row(f"GPTQ {s} + rotation", avg_bits(inputs, layers), layers, hadamard=True)
    from mxmoe_jax.alloc.problem import load_inputs
    from mxmoe_jax.alloc.solve import SolveConfig, solve_allocation
    wa = load_inputs(args.work / "trace.json", args.work / "loss-wa.json",
                     args.work / "perf-wa.json", batch=512, schemes=list(WA_SCHEMES))
    cfg = SolveConfig(wbits=5.0, abits=5.0, r=0.75, mode="layer", hull=0)
    w5a5 = solve_allocation(wa, cfg, progress=False).qconfig["layers"]
    row("MxMoE W5A5 (r = 0.75) + rotation", avg_bits(inputs, w5a5), w5a5, hadamard=True)

    fp = rows[0]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    out = args.out or Path(__file__).parent / "results" / f"table1-{stamp}-cpu.json"
    import jax
    doc = dict(date=stamp, device=f"CPU ({platform.machine()})", jax=jax.__version__,
               windows=args.windows, proxy=args.proxy, mode=args.mode, rows=rows)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    print(f"\nwrote {out}\n")
    print("| allocation | avg weight bits | books-eval ppl | WikiText-2 ppl |")
    print("|---|---|---|---|")
    for r in rows:
        rel = 100 * (r["books"] / fp["books"] - 1)
        print(f"| {r['label']} | {r['wbits']:.3f} | {r['books']:.2f} ({rel:+.1f}%) | "
              f"{r['wiki']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
