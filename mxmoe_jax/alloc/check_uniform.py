"""Check a trace + loss pair: at equal average bits, the solver's L is <= every uniform scheme's L.

``python -m mxmoe_jax.alloc.check_uniform --trace trace.json --loss loss.json [--perf perf.json]``
solves once per uniform scheme with ``--wbits`` set to that scheme's own average bits and ``r = 1``
(accuracy only), and prints both losses. Without ``--perf`` it uses an analytic H200 table for the
trace's shapes (times do not enter at r = 1). Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mxmoe_jax.alloc.problem import AllocInputs, build_inputs
from mxmoe_jax.alloc.solve import SolveConfig, solve_allocation
from mxmoe_jax.perf.analytic import analytic_table
from mxmoe_jax.perf.devices import DEVICES
from mxmoe_jax.perf.model import PerfModel


def perf_for_trace(trace: dict, schemes, device: str = "H200") -> PerfModel:
    """An analytic table covering the trace's GEMM shapes (routed and shared experts)."""
    inter, hidden = (int(v) for v in trace["NK"])
    shared = round(float(trace.get("num_shared_experts", 0) or 0) * inter)
    gemms = [(2 * inter, hidden), (hidden, inter)]
    if shared:
        gemms += [(2 * shared, hidden), (hidden, shared)]
    return PerfModel(analytic_table(DEVICES[device], list(dict.fromkeys(gemms)), schemes=schemes))


def check_against_uniform(inputs: AllocInputs, *, mode: str = "layer") -> list[dict]:
    """One row per uniform scheme that fits every block: its L and bits, the solver's L there."""
    rows = []
    base = solve_allocation(inputs, SolveConfig(wbits=16.0, r=1.0, mode=mode, hull=0),
                            progress=False)
    for name, uni in base.uniform.items():
        if uni is None:
            continue
        # the uniform assignment meets its own budget in every layer (and in the model)
        res = solve_allocation(inputs, SolveConfig(wbits=uni["wbits"] + 1e-9, r=1.0, mode=mode,
                                                   hull=0), progress=False)
        rows.append(dict(scheme=name, wbits=uni["wbits"], uniform_L=uni["L"],
                         solver_L=res.totals["L"], solver_wbits=res.totals["wbits"],
                         ok=res.totals["L"] <= uni["L"] * (1 + 1e-9) + 1e-12))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--loss", required=True)
    p.add_argument("--perf", help="perf.json (default: analytic H200 for the trace's shapes)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--mode", choices=("layer", "model"), default="layer")
    args = p.parse_args(argv)
    trace = json.loads(Path(args.trace).read_text())
    loss = json.loads(Path(args.loss).read_text())
    perf = (PerfModel.load(args.perf) if args.perf
            else perf_for_trace(trace, list(loss["losses"])))
    inputs = build_inputs(trace, loss, perf, batch=args.batch)
    rows = check_against_uniform(inputs, mode=args.mode)
    print(f"{'uniform scheme':<20}{'W bits':>8}{'uniform L':>14}{'solver L':>14}{'solver/uni':>11}")
    for r in rows:
        ratio = r["solver_L"] / r["uniform_L"] if r["uniform_L"] else float("nan")
        print(f"{r['scheme']:<20}{r['wbits']:>8.3f}{r['uniform_L']:>14.6g}{r['solver_L']:>14.6g}"
              f"{ratio:>11.4f}  {'ok' if r['ok'] else 'FAIL'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
