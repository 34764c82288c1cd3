"""``mxmoe-jax convert``: a Hugging Face MoE folder -> MODEL_DIR (Orbax, layer by layer)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face MoE checkpoint to a MODEL_DIR",
                       description=__doc__)
    p.add_argument("--hf", required=True, help="HF folder: config.json + *.safetensors")
    p.add_argument("--out", required=True, help="MODEL_DIR to write")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="parameter dtype written (default fp32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mxmoe_jax.convert.hf_to_flax import convert_hf

    r = convert_hf(args.hf, args.out, args.dtype, force=args.force, progress=True)
    mib = 2**20
    print(f"wrote {r.out} ({r.model_type}, {r.num_params:,} params, {r.dtype}, "
          f"{r.num_groups} groups) in {r.seconds:.1f}s")
    print(f"peak host memory {r.peak_rss_bytes / mib:.0f} MiB (process; at start "
          f"{r.start_rss_bytes / mib:.0f} MiB); largest group held "
          f"{r.max_group_bytes / mib:.1f} MiB")
    return 0
