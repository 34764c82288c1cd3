"""``mxmoe-jax solve``: choose a scheme per linear block (the MxMoE MILP), with its Pareto frontier.

Writes ``--out`` (qconfig.json, schema in `mxmoe_jax.alloc.qconfig`) and beside it
``<stem>.pareto.csv``, ``<stem>.frontier.png`` and ``<stem>.heatmap.png``; prints mixed vs uniform.
``--import-original F`` instead converts an original MxMoE qconfig to ours (no solving).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solve", help="bit allocation per linear block (MILP + Pareto frontier)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", help="trace.json from `mxmoe-jax trace`")
    p.add_argument("--loss", help="loss.json from `mxmoe-jax calibrate`")
    p.add_argument("--perf", help="perf.json from `mxmoe-jax profile`")
    p.add_argument("--wbits", type=float, help="average weight bits, scales included (w4 g128 = "
                   "4.25)")
    p.add_argument("--abits", type=float, help="average activation-bit budget (default: none)")
    p.add_argument("--batch", type=int, default=512, help="tokens per forward pass (default 512)")
    p.add_argument("--r", type=float, default=0.75,
                   help="objective L^r T^(1-r): 1 = accuracy only, 0 = speed only (default 0.75)")
    p.add_argument("--mode", choices=("layer", "model"), default="layer",
                   help="budget per layer (default) or for the whole model")
    p.add_argument("--granularity", choices=("linear", "expert"), default="linear",
                   help="a scheme per block group (default) or per expert")
    p.add_argument("--proxy", choices=("squared", "frobenius"), default="squared",
                   help="a block's loss from its Δ: squared = Δ² (default; squared errors add), "
                        "frobenius = Δ (the original MxMoE)")
    p.add_argument("--sensitivity", metavar="FILE",
                   help="sensitivity.json from `mxmoe-jax sensitivity`: weigh each layer's proxy "
                        "by its measured loss per unit of Δ² (matters with --mode model)")
    p.add_argument("--schemes", nargs="+", metavar="S",
                   help="candidate schemes (default: every scheme in loss.json)")
    p.add_argument("--strict", action="store_true",
                   help="refuse a measured perf.json from another GPU or other kernels (default: "
                        "warn)")
    p.add_argument("--hull", type=int, default=4,
                   help="frontier points per layer to find for the plot (default 4)")
    p.add_argument("--grid", type=int, default=0,
                   help="extra ε-constraint probes per layer at evenly spaced τ (default 0)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="stop the L^r T^(1-r) search within this relative margin of the optimum "
                        "(default 0: exact; 1e-3 = 0.1%%, fewer MILPs)")
    p.add_argument("--exact", action="store_true",
                   help="no time limit per MILP (default 20 s; every MILP has zero gap)")
    p.add_argument("--solver", choices=("highs", "cbc"), default="highs")
    p.add_argument("--jobs", type=int, default=1,
                   help="processes solving layers in parallel (default 1)")
    p.add_argument("--devices", type=int, default=1,
                   help="expert parallelism: T = the busiest of N devices, routed experts placed "
                        "contiguously (layer mode; default 1)")
    p.add_argument("--out", required=True, help="qconfig.json to write")
    p.add_argument("--export-original", metavar="PATH",
                   help="also write the assignment in the original MxMoE schema")
    p.add_argument("--import-original", metavar="PATH",
                   help="convert an original MxMoE qconfig to --out instead of solving")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import json
    import math

    from mxmoe_jax.alloc.qconfig import from_original, to_original
    from mxmoe_jax.jsonio import check_writable, write_json_atomic

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite")
    check_writable(out)
    if args.import_original:
        src = Path(args.import_original)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: original qconfig not found")
        q = from_original(json.loads(src.read_text()), source=str(src))
        write_json_atomic(out, q)
        print(f"wrote {out}: {len(q['layers'])} layers imported from {src}")
        return 0
    missing = [f"--{n}" for n in ("trace", "loss", "perf", "wbits") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or use --import-original)")

    from mxmoe_jax.alloc.problem import load_inputs
    from mxmoe_jax.alloc.report import plot_frontier, plot_heatmap, summary_table, write_pareto_csv
    from mxmoe_jax.alloc.solve import SolveConfig, solve_allocation

    inputs = load_inputs(args.trace, args.loss, args.perf, batch=args.batch, schemes=args.schemes)
    from mxmoe_jax.perf.profile import current_device, kernel_version

    for msg in inputs.perf.check_provenance(device=current_device(),
                                            kernel_version=kernel_version(), strict=args.strict,
                                            warn=False):
        print(f"mxmoe-jax solve: warning: {msg}", file=sys.stderr)
    print(f"time model: {inputs.perf.label}", file=sys.stderr)
    meta = dict(trace=args.trace, loss=args.loss)
    if args.sensitivity:
        from mxmoe_jax.alloc.problem import layer_weights, load_sensitivity, weigh_layers

        weights = layer_weights(load_sensitivity(args.sensitivity),
                                [ld.layer for ld in inputs.layers])
        inputs = weigh_layers(inputs, weights, args.proxy)
        meta.update(sensitivity=args.sensitivity, layer_weights=weights)
        if args.mode == "layer":
            print("note: --sensitivity weighs layers against each other; with --mode layer "
                  "(a budget per layer) it changes nothing", file=sys.stderr)
    kw = dict(wbits=args.wbits, abits=args.abits, r=args.r, mode=args.mode, proxy=args.proxy,
              granularity=args.granularity, hull=args.hull, grid=args.grid, solver=args.solver,
              jobs=args.jobs, f_tol=math.log1p(args.tol), devices=args.devices)
    cfg = SolveConfig.exact(**kw) if args.exact else SolveConfig(**kw)
    try:
        result = solve_allocation(inputs, cfg, meta=meta)
    except RuntimeError as err:  # a solver failure: one line, as for bad input
        raise ValueError(f"the MILP solver failed: {err}") from None
    write_json_atomic(out, result.qconfig)
    written = [out]
    stem = out.with_suffix("")
    written.append(write_pareto_csv(result, f"{stem}.pareto.csv"))
    if not args.no_plots:
        written.append(plot_frontier(result, f"{stem}.frontier.png"))
        written.append(plot_heatmap(result, f"{stem}.heatmap.png"))
    if args.export_original:
        written.append(write_json_atomic(args.export_original, to_original(result.qconfig)))
    print(summary_table(result))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
