"""``mxmoe-jax quantize``: apply an allocation (or one scheme) to a MODEL_DIR -> QMODEL_DIR."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model's expert blocks into a QMODEL_DIR",
                       description=__doc__)
    p.add_argument("--model", required=True, help="MODEL_DIR written by `mxmoe-jax convert`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--qconfig", help="allocation: qconfig.json from `mxmoe-jax solve`")
    q.add_argument("--scheme", help="one scheme for every expert block, e.g. w4a16_g128_asym")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="weight quantizer (gptq needs --calib)")
    p.add_argument("--hadamard", action="store_true",
                   help="rotate first (QuaRot-style, with the online down_proj rotation)")
    p.add_argument("--calib", nargs="+", metavar="FILE", help="GPTQ calibration text file(s)")
    p.add_argument("--calib-windows", type=int, default=16,
                   help="GPTQ calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length (512)")
    p.add_argument("--seed", type=int, default=42,
                   help="rotation / calibration sampling seed (default 42, as calibrate)")
    p.add_argument("--allow-quantizer-mismatch", action="store_true",
                   help="quantize with --method/--hadamard even where they differ from the "
                        "quantizer the qconfig's losses were measured with (a warning, not an "
                        "error)")
    p.add_argument("--out", required=True, help="QMODEL_DIR to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mxmoe_jax.quantize.pipeline import QuantizeConfig, quantize_dir

    config = QuantizeConfig(method=args.method, hadamard=args.hadamard, seed=args.seed,
                            calib=tuple(args.calib or ()), calib_windows=args.calib_windows,
                            seqlen=args.seqlen)
    manifest = quantize_dir(args.model, args.out, qconfig=args.qconfig, scheme=args.scheme,
                            config=config, force=args.force, progress=True,
                            allow_quantizer_mismatch=args.allow_quantizer_mismatch)
    b = manifest["bytes"]
    mib = 2 ** 20
    print(f"wrote {args.out}: {b['total'] / mib:.2f} MiB on disk")
    print(f"  expert weights: the allocation's bits predict {b['experts_predicted'] / mib:.2f} MiB;"
          f" stored arrays {b['experts_stored'] / mib:.2f} MiB "
          f"({b['experts_stored'] / max(b['experts_predicted'], 1):.3f}x), on disk "
          f"{b['experts_on_disk'] / mib:.2f} MiB (Orbax, uncompressed, "
          f"{b['experts_on_disk'] / max(b['experts_predicted'], 1):.3f}x)")
    print(f"  unquantized rest: {b['rest'] / mib:.2f} MiB of arrays, {b['rest_on_disk'] / mib:.2f} "
          "MiB on disk")
    return 0
