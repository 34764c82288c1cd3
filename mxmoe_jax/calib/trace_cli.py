"""``mxmoe-jax trace``: tokens and routing weight per expert per MoE layer -> trace.json (+ PNG)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trace", help="tokens per expert per MoE layer on a text (trace.json + heatmap)",
        description=__doc__ + " Counts are averaged over the windows and rounded, as the "
        "original MxMoE's moe_tracer (its access_freq schema).")
    p.add_argument("--model", required=True, help="MODEL_DIR written by `mxmoe-jax convert`")
    p.add_argument("--text", required=True, nargs="+", metavar="FILE",
                   help="UTF-8 text file(s), joined by blank lines and tokenized once")
    p.add_argument("--out", required=True, help="trace.json to write")
    p.add_argument("--plot", help="also write a heatmap PNG (layers x experts)")
    p.add_argument("--seqlen", type=int, default=4096, help="tokens per window (default 4096)")
    p.add_argument("--nsamples", type=int, default=32, help="windows (default 32)")
    p.add_argument("--sampling", choices=("sample", "whole"), default="sample",
                   help="random windows (the original's, seeded) or consecutive ones from the "
                        "start (default sample)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")
    p.add_argument("--tokenizer", help="folder with the HF tokenizer (default: the model folder)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per forward pass (whole windows; default 8192)")
    p.add_argument("--force", action="store_true", help="overwrite --out / --plot")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mxmoe_jax.calib.trace import plot_traces, trace_files
    from mxmoe_jax.jsonio import check_writable, write_json_atomic

    for path in (args.out, args.plot):
        if path and Path(path).exists() and not args.force:
            raise FileExistsError(f"{path} exists; pass --force to overwrite it")
        if path:
            check_writable(path)  # before the forward passes, not after
    trace = trace_files(args.model, args.text, seqlen=args.seqlen, nsamples=args.nsamples,
                        sampling=args.sampling, seed=args.seed, tokenizer_dir=args.tokenizer,
                        batch_tokens=args.batch_tokens, progress=True)
    write_json_atomic(args.out, trace)
    if args.plot:
        title = f"{Path(args.model).name}: {', '.join(Path(t).name for t in args.text)}"
        plot_traces([trace], [title], args.plot)
    print(f"{'layer':>5}  {'busiest expert':>14}  {'share':>6}  {'idlest':>6}  {'share':>6}")
    for i in trace["moe_layers"]:
        f = trace[f"layer-{i}"]["access_freq"]
        total = max(sum(f), 1)
        hi = max(range(len(f)), key=f.__getitem__)
        lo = min(range(len(f)), key=f.__getitem__)
        print(f"{i:>5}  {hi:>14}  {100 * f[hi] / total:5.1f}%  {lo:>6}  "
              f"{100 * f[lo] / total:5.1f}%")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0
