"""The layer-time predictor against measured mixed layers (issue: a measured performance model).

``python -m bench.predictor --perf perf.json [--models ...] [--tokens 32 512 8192] [--allocs 50]
[--schemes ...] [--out bench/results]`` on an NVIDIA GPU. For each model shape and token count,
with Zipf routing (``perf.predict.zipf_group_sizes``) and random normal data:

* ``--allocs`` random mixed allocations: the experts' gate_up and down each get a random
  permutation of an equal split over ``--schemes``, plus the uniform allocation of each scheme;
* each runs as the layer's two mixed launches (gate_up with SiLU·up in the epilogue, then down;
  ``kernels.pallas.mixed_grouped_matmul``) with the assignment as runtime data, so one compile
  serves every permutation; device time from ``jax.profiler`` (``perf.timing``);
* predicted by ``perf.predict.layer_us`` from ``--perf`` (measured) and from the H200 analytic
  roofline, for comparison.

Prints the share of points within 10% per table, the w4a16 vs w8a8 ranking per token count, and
writes ``predictor-<date>.json`` and a scatter PNG. ``--interpret --small`` runs the procedure
once in Pallas interpret mode on a small shape without times (a CPU check of the program).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

from mxmoe_jax.perf.shapes import PRESETS, MoEShapes

SCHEMES = ("w16a16", "w8a8_g-1_sym", "w4a16_g128_asym", "w4a4_g-1_sym")
SMALL = MoEShapes(name="small", hidden=256, moe_inter=128, num_experts=8, top_k=2)


def _stacks(w, assignment, schemes):
    from bench.mixed_layer import stacks_for

    return [q for q, _ in stacks_for(w, assignment, schemes)]


def allocations(e: int, n_schemes: int, count: int, seed: int):
    """(name, gate_up assignment, down assignment): ``count`` random equal splits of the
    experts over ``n_schemes`` stacks."""
    rng = np.random.default_rng(seed)
    base = np.arange(e) % n_schemes
    return [(f"random{i}", tuple(int(a) for a in rng.permutation(base)),
             tuple(int(a) for a in rng.permutation(base))) for i in range(count)]


def run_shape(shape: MoEShapes, tokens: int, schemes, perfs: dict, *, allocs: int, reps: int,
              interpret: bool, seed: int):
    import jax
    import jax.numpy as jnp

    from kernels.pallas import mixed_grouped_matmul
    from mxmoe_jax.perf.predict import layer_us, zipf_group_sizes

    e, d, i = shape.num_experts, shape.hidden, shape.moe_inter
    gs_np = zipf_group_sizes(tokens, e, shape.top_k, seed=seed + tokens)
    gs = jnp.asarray(gs_np)
    kx, kg, kd = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (tokens * shape.top_k, d), jnp.float32).astype(jnp.bfloat16)
    w_gu = 0.02 * jax.random.normal(kg, (e, d, 2 * i), jnp.float32)
    w_dn = 0.02 * jax.random.normal(kd, (e, i, d), jnp.float32)

    def layer(x, gu, dn, gs, a_gu, a_dn):
        h = mixed_grouped_matmul(x, gu, gs, a_gu, epilogue="swiglu", interpret=interpret)
        return mixed_grouped_matmul(h, dn, gs, a_dn, interpret=interpret)

    if interpret:
        def timed(fn, *a):
            jax.block_until_ready(fn(*a))
            return None
    else:
        from mxmoe_jax.perf.timing import device_time_us

        def timed(fn, *a):
            return round(float(device_time_us(fn, *a, n=reps)), 2)
    mixed = jax.jit(layer)  # one compile for every permutation (the assignment is data)
    uniform = {}  # one stack of all experts: a compile of its own per scheme
    rows = []
    plans = [(n, schemes, g, dd) for n, g, dd in allocations(e, len(schemes), allocs, seed)]
    plans += [(f"uniform {s}", (s,), (0,) * e, (0,) * e) for s in schemes]
    for name, mix, a_gu, a_dn in plans:
        gu, dn = _stacks(w_gu, a_gu, mix), _stacks(w_dn, a_dn, mix)
        args = (x, gu, dn, gs, jnp.asarray(a_gu, jnp.int32), jnp.asarray(a_dn, jnp.int32))
        fn = mixed if len(mix) > 1 else uniform.setdefault(mix[0], jax.jit(layer))
        us = timed(fn, *args)
        names_gu = [mix[a] for a in a_gu]
        names_dn = [mix[a] for a in a_dn]
        pred = {k: round(layer_us(p, shape, names_gu, names_dn, gs_np), 2)
                for k, p in perfs.items()}
        rows.append(dict(model=shape.name, tokens=tokens, alloc=name, us=us, predicted=pred,
                         max_rows=int(gs_np.max())))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def summarise(rows, perfs) -> list[str]:
    lines = []
    timed = [r for r in rows if r["us"] is not None]
    for k in perfs:
        err = np.array([abs(r["predicted"][k] - r["us"]) / r["us"] for r in timed])
        if len(err):
            lines.append(f"{k}: {np.mean(err <= 0.10):.0%} of {len(err)} points within 10% "
                         f"(median error {np.median(err):.1%}, max {err.max():.1%})")
    for (model, tokens) in sorted({(r["model"], r["tokens"]) for r in timed}):
        u = {r["alloc"]: r for r in timed if r["model"] == model and r["tokens"] == tokens
             and r["alloc"] in ("uniform w4a16_g128_asym", "uniform w8a8_g-1_sym")}
        if len(u) == 2:
            a, b = u["uniform w4a16_g128_asym"], u["uniform w8a8_g-1_sym"]
            meas = "w4a16" if a["us"] < b["us"] else "w8a8"
            preds = {k: "w4a16" if a["predicted"][k] < b["predicted"][k] else "w8a8"
                     for k in perfs}
            lines.append(f"{model} {tokens} tokens: faster uniform measured {meas}; predicted "
                         + ", ".join(f"{k} {v}" for k, v in preds.items()))
    return lines


def scatter(rows, perfs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["us"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, marker in zip(perfs, "ox", strict=False):
        ax.scatter([r["us"] for r in timed], [r["predicted"][k] for r in timed], s=12,
                   marker=marker, label=k)
    lim = [min(r["us"] for r in timed) * 0.8, max(r["us"] for r in timed) * 1.25]
    ax.plot(lim, lim, "k-", lw=0.8)
    for f in (0.9, 1.1):
        ax.plot(lim, [v * f for v in lim], "k:", lw=0.6)
    ax.set(xscale="log", yscale="log", xlabel="measured layer µs (device)",
           ylabel="predicted µs", title="mixed MoE layer: predicted vs measured")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.predictor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--perf", help="measured perf.json (mxmoe-jax profile)")
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--tokens", nargs="+", type=int, default=[32, 512, 8192])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--allocs", type=int, default=50)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpret", action="store_true")
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    import jax

    from mxmoe_jax.perf.analytic import analytic_table
    from mxmoe_jax.perf.devices import get_device
    from mxmoe_jax.perf.model import PerfModel

    if not args.interpret and jax.devices()[0].platform != "gpu":
        print("bench.predictor: needs an NVIDIA GPU (or --interpret --small)", file=sys.stderr)
        return 2
    shapes = [SMALL] if args.small else [PRESETS[m] for m in args.models]
    schemes = list(args.schemes)
    perfs = {}
    if args.perf:
        perfs["measured"] = PerfModel.load(args.perf)
    for s in shapes:  # the analytic roofline of the H200 for the same points
        tab = analytic_table(get_device("H200"), s, schemes=schemes)
        if "analytic" not in perfs:
            perfs["analytic"] = PerfModel(tab)
        else:
            perfs["analytic"] = PerfModel(dict(tab, points=perfs["analytic"].table["points"]
                                               + tab["points"]))
    rows = []
    for shape in shapes:
        for t in args.tokens:
            rows += run_shape(shape, t, schemes, perfs, allocs=args.allocs, reps=args.reps,
                              interpret=args.interpret, seed=args.seed)
    lines = summarise(rows, perfs)
    print("\n".join(lines))
    dev = jax.devices()[0]
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H%MZ")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-interpret" if args.interpret else ""
    path = args.out / f"predictor-{stamp}{suffix}.json"
    doc = dict(date=stamp, device=dev.device_kind, jax=jax.__version__, perf=args.perf,
               schemes=schemes, summary=lines, rows=rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    if not args.interpret:
        scatter(rows, perfs, path.with_suffix(".png"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
