"""``mxmoe-jax profile``: write perf.json, the kernel cost table the solver reads.

Measured (the default, on an NVIDIA GPU): for every model shape given, every scheme and every
count of tokens per expert in ``--tokens``, one launch of the Pallas grouped GEMM over the model's
experts is timed with ``jax.profiler`` device time (`mxmoe_jax.perf.profile`); the table records
the device, JAX version, date and kernel version, and ``solve`` warns when it is used with
another GPU or other kernels. ``--analytic DEVICE`` instead writes the roofline fallback (any
machine, labelled ``analytic``).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from mxmoe_jax.perf.devices import DEVICES
    from mxmoe_jax.perf.profile import DEFAULT_TOKENS
    from mxmoe_jax.perf.shapes import PRESETS

    p = sub.add_parser("profile", help="kernel cost table (perf.json) for the solver",
                       description=__doc__)
    p.add_argument("--analytic", metavar="DEVICE",
                   help=f"analytic roofline for a named device instead of measuring: "
                        f"{', '.join(DEVICES)}")
    p.add_argument("--shapes", required=True, nargs="+", metavar="MODEL",
                   help="model folders, config.json files or presets: " + ", ".join(PRESETS))
    p.add_argument("--schemes", nargs="+", metavar="S",
                   help="schemes to tabulate (default: w16a16, the original's set, w8a8_g-1_fp8)")
    p.add_argument("--tokens", nargs="+", type=int, metavar="M", default=list(DEFAULT_TOKENS),
                   help="tokens per expert to measure (default: "
                        + " ".join(map(str, DEFAULT_TOKENS)) + ")")
    p.add_argument("--reps", type=int, default=10, help="timed calls per point (default 10)")
    p.add_argument("--out", required=True, help="perf.json to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mxmoe_jax.jsonio import write_json_atomic
    from mxmoe_jax.perf.analytic import DEFAULT_SCHEMES, analytic_table
    from mxmoe_jax.perf.shapes import load_shapes

    shapes = [load_shapes(s) for s in args.shapes]
    schemes = args.schemes or DEFAULT_SCHEMES
    if args.analytic:
        from mxmoe_jax.perf.devices import get_device

        if len(shapes) != 1:
            raise ValueError("--shapes: --analytic takes one model shape")
        device = get_device(args.analytic)
        table = analytic_table(device, shapes[0], schemes=schemes)
        what = (f"analytic roofline for {device.name} "
                f"({'measured ceilings' if device.measured else 'datasheet, derated'})")
    else:
        from mxmoe_jax.perf.profile import current_device, measure_table

        if current_device() is None:
            raise ValueError("profile: measuring needs an NVIDIA GPU and this machine has none; "
                             "use --analytic DEVICE for the roofline fallback, or the shipped "
                             "H200 table where it covers your model")
        if args.reps < 1:
            raise ValueError(f"--reps: must be >= 1, got {args.reps}")
        from pathlib import Path

        if Path(args.out).exists() and not args.force:  # before minutes of measuring
            raise FileExistsError(f"{args.out} exists; pass --force to overwrite")
        table = measure_table(shapes, schemes, args.tokens, reps=args.reps)
        what = f"measured on {table['device']} (kernels {table['kernel_version']})"
    write_json_atomic(args.out, table, force=args.force)
    gemms = "; ".join(f"{s.name}: " + ", ".join(f"{n}x{k}" for n, k in s.gemms()) for s in shapes)
    print(f"wrote {args.out}: {what}, {len(table['points'])} points, GEMMs (n x k) {gemms}")
    for s in table["skipped"]:
        print(f"  skipped {s['scheme']} at n={s['n']} k={s['k']}: {s['why']}")
    return 0
