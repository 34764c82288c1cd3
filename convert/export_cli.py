"""``mxmoe-jax export-hf``: a MODEL_DIR -> Hugging Face folder (safetensors, hub layout)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-hf", help="export a MODEL_DIR to a Hugging Face folder",
                       description=__doc__)
    p.add_argument("--model", required=True, help="MODEL_DIR written by `mxmoe-jax convert`")
    p.add_argument("--out", required=True, help="HF folder to write")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="dtype written (default: as stored)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mxmoe_jax.convert.export import export_hf

    out = export_hf(args.model, args.out, force=args.force, dtype=args.dtype, progress=True)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0
