"""``mxmoe-jax profile``: write perf.json, the kernel cost table the solver reads.

Today only ``--analytic DEVICE`` exists (a roofline from the device's bandwidth and matrix rates);
the measured profiler (a later issue) writes the same schema with ``"source": "measured"``.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from mxmoe_jax.perf.devices import DEVICES
    from mxmoe_jax.perf.shapes import PRESETS

    p = sub.add_parser("profile", help="kernel cost table (perf.json) for the solver",
                       description=__doc__)
    p.add_argument("--analytic", metavar="DEVICE", required=True,
                   help=f"analytic roofline for a named device: {', '.join(DEVICES)}")
    p.add_argument("--shapes", required=True, metavar="MODEL",
                   help="a model folder, its config.json, or a preset: " + ", ".join(PRESETS))
    p.add_argument("--schemes", nargs="+", metavar="S",
                   help="schemes to tabulate (default: w16a16, the original's set, w8a8_g-1_fp8)")
    p.add_argument("--out", required=True, help="perf.json to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from mxmoe_jax.jsonio import write_json_atomic
    from mxmoe_jax.perf.analytic import DEFAULT_SCHEMES, analytic_table
    from mxmoe_jax.perf.devices import get_device
    from mxmoe_jax.perf.shapes import load_shapes

    device = get_device(args.analytic)
    shapes = load_shapes(args.shapes)
    table = analytic_table(device, shapes, schemes=args.schemes or DEFAULT_SCHEMES)
    write_json_atomic(args.out, table, force=args.force)
    gemms = ", ".join(f"{n}x{k}" for n, k in shapes.gemms())
    print(f"wrote {args.out}: analytic roofline for {device.name} "
          f"({'measured ceilings' if device.measured else 'datasheet, derated'}), "
          f"{len(table['points'])} points, GEMMs (n x k) {gemms}")
    for s in table["skipped"]:
        print(f"  skipped {s['scheme']} at n={s['n']} k={s['k']}: {s['why']}")
    return 0
