"""``mxmoe-jax calibrate``: Δ per (MoE layer, expert incl. shared, block, scheme) -> loss.json."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="quantization loss of every expert block per scheme (loss.json)",
        description=__doc__ + " Δ = ||Ô − O||_F of the layer output (layer_out_norm) when only "
        "that block is quantized, over every calibration token, on FP layer inputs; all "
        "experts of a layer are evaluated in one jitted pass per token chunk. An interrupted "
        "run resumes from <out>.partial.json.")
    p.add_argument("--model", required=True, help="MODEL_DIR written by `mxmoe-jax convert`")
    p.add_argument("--text", required=True, nargs="+", metavar="FILE",
                   help="UTF-8 calibration text file(s), joined by blank lines")
    p.add_argument("--schemes", required=True, nargs="+", metavar="S",
                   help="scheme names (w4a16_g128_asym, w8a8_g-1_sym, ...) or 'original' for "
                        "the original MxMoE's calibrated set")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="weight quantizer (gptq: Hessians from each expert's routed tokens)")
    p.add_argument("--hadamard", action="store_true",
                   help="Hadamard-rotate the model first (QuaRot-style, seeded by --seed)")
    p.add_argument("--metric", choices=("layer_out_norm", "model_out_norm"),
                   default="layer_out_norm",
                   help="layer_out_norm (default, exact shortcut) or model_out_norm: the final "
                        "hidden state, by brute force (L*(E+1)*3 partial forwards per scheme: "
                        "only usable on tiny models)")
    p.add_argument("--out", required=True, help="loss.json to write")
    p.add_argument("--seqlen", type=int, default=4096, help="tokens per window (default 4096)")
    p.add_argument("--nsamples", type=int, default=128, help="windows (default 128)")
    p.add_argument("--sampling", choices=("sample", "whole"), default="sample",
                   help="random windows (the original's, seeded) or consecutive ones")
    p.add_argument("--seed", type=int, default=42, help="sampling / rotation seed (default 42)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per jitted chunk: bounds device memory (default 8192)")
    p.add_argument("--layers", type=int, nargs="+", metavar="I",
                   help="calibrate only these MoE layers (default: all)")
    p.add_argument("--devices", type=int, default=1,
                   help="shard the routed experts over N devices (layer_out_norm; on the CPU "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N; default 1)")
    p.add_argument("--tokenizer", help="folder with the HF tokenizer (default: the model folder)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mxmoe_jax.calib.calibrate import CalibConfig, calibrate_files
    from mxmoe_jax.jsonio import check_writable
    from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES

    if Path(args.out).exists() and not args.force:
        raise FileExistsError(f"{args.out} exists; pass --force to overwrite it")
    check_writable(args.out)  # before the calibration, not after
    schemes = []
    for s in args.schemes:
        schemes.extend(ORIGINAL_SCHEMES if s == "original" else [s])
    config = CalibConfig(schemes=tuple(dict.fromkeys(schemes)), method=args.method,
                         hadamard=args.hadamard, metric=args.metric,
                         batch_tokens=args.batch_tokens,
                         layers=tuple(args.layers) if args.layers else None,
                         devices=args.devices)
    result = calibrate_files(args.model, args.text, config, out=args.out, seqlen=args.seqlen,
                             nsamples=args.nsamples, sampling=args.sampling, seed=args.seed,
                             tokenizer_dir=args.tokenizer, progress=True)
    from mxmoe_jax.models.io import load_config

    print(summary_table(result, load_config(args.model).num_experts))
    print(f"wrote {args.out}")
    return 0


def summary_table(result: dict, num_experts: int) -> str:
    """Mean Δ per scheme and block over all layers, routed experts (indices < ``num_experts``) and
    the shared expert (index ``num_experts``) apart; null entries (a loss.json from before group
    sizes that do not divide K were substituted) are counted apart."""
    import numpy as np

    def means(rows):
        if not rows:
            return [np.nan] * 3, 0
        vals = np.array([[np.nan if v is None else v for v in blocks] for blocks in rows], float)
        m = [np.nanmean(vals[:, b]) if np.isfinite(vals[:, b]).any() else np.nan for b in range(3)]
        return m, int(np.isnan(vals).sum())

    def fmt(m):
        return " ".join(f"{v:>9.4g}" if np.isfinite(v) else f"{'n/a':>9}" for v in m)

    lines = [f"{'scheme':<18} {'gate':>9} {'up':>9} {'down':>9} | {'sh.gate':>9} {'sh.up':>9} "
             f"{'sh.down':>9} {'null':>5}   (mean Δ over layers; routed | shared expert)"]
    for name, layers in result["losses"].items():
        rows = [(int(e), blocks) for experts in layers.values() for e, blocks in experts.items()]
        (mr, nr) = means([b for e, b in rows if e < num_experts])
        (ms, ns) = means([b for e, b in rows if e >= num_experts])
        lines.append(f"{name:<18} {fmt(mr)} | {fmt(ms)} {nr + ns:>5}")
    return "\n".join(lines)
