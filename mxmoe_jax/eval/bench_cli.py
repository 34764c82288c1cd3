"""``mxmoe-jax bench``: device time of a model's MoE layers, its allocation beside bf16 and every
uniform scheme.

For each chosen MoE layer and token count, the layer (router, sort, experts, combine, shared
expert) runs under ``jit`` on random normal hidden states with each set of expert weights:

* ``model``: the model's own (a QMODEL_DIR's allocation; a MODEL_DIR's FP weights in bf16);
* ``bf16``: every expert in bf16 (a QMODEL_DIR's dequantized values);
* one row per ``--schemes`` entry: every expert RTN-quantized with that scheme (``QScheme.for_k``
  of it per block), from the same values as ``bf16``.

On an NVIDIA GPU each variant runs on the Pallas kernels (one mixed-precision launch per
projection) and is timed with ``jax.profiler`` device time (``perf.timing``: the sum of the
call's kernel events, mean of ``--reps`` calls; never host timers). Every variant's output is
compared with the bf16 layer's (``rel_to_bf16``) and with its own reference path
(``rel_to_reference``: the kernels against dequantized f32 math). Without an NVIDIA GPU there is
nothing to time: the command says so and exits 2, unless ``--reference`` asks for the reference
path alone (outputs and errors, no times).

Writes ``--out/bench.json`` (device, JAX version, date, rows), ``bench.md`` (the table, also
printed) and, with times, ``bench.png`` (device time per variant and token count).
"""

from __future__ import annotations

import argparse

DEFAULT_TOKENS = (32, 1024, 8192)
DEFAULT_SCHEMES = ("w8a8_g-1_sym", "w8a8_g-1_fp8", "w4a8_g-1_sym", "w4a4_g-1_sym",
                   "w8a16_g-1_sym", "w4a16_g128_asym", "w3a16_g128_asym", "w2a16_g128_asym")
BENCH_FORMAT = "mxmoe-jax.bench/1"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="device time of the model's MoE layers per allocation",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a MODEL_DIR or a QMODEL_DIR")
    p.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS),
                   help="tokens entering the layer (default: 32 1024 8192)")
    p.add_argument("--layers", nargs="+", type=int,
                   help="MoE layers to run (default: the first MoE layer)")
    p.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), metavar="S",
                   help="uniform schemes beside the model's allocation and bf16")
    p.add_argument("--reps", type=int, default=20, help="traced calls per timing (default 20)")
    p.add_argument("--reference", action="store_true",
                   help="run the reference path only (no times): for machines without a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--force", action="store_true", help="overwrite files in --out")
    p.set_defaults(func=main)


def _check(args, cfg) -> list[int]:
    from mxmoe_jax.quant.scheme import QScheme

    if not args.tokens or any(t < 1 for t in args.tokens):
        raise ValueError(f"--tokens: need positive token counts, got {args.tokens}")
    if args.reps < 1:
        raise ValueError(f"--reps: must be >= 1, got {args.reps}")
    for s in args.schemes:
        QScheme.parse(s)  # names the bad scheme
    moe = list(cfg.moe_layers)
    if not moe:
        raise ValueError(f"--model: {args.model} has no MoE layer")
    layers = args.layers or moe[:1]
    bad = [i for i in layers if i not in moe]
    if bad:
        raise ValueError(f"--layers: {bad} are not MoE layers of this model (MoE layers: {moe})")
    return layers


def stack_values(weights) -> dict:
    """``{proj: [E, K, N] f32}`` of an ``ExpertWeights`` of any format (gate_up fused)."""
    import jax.numpy as jnp
    import numpy as np

    from mxmoe_jax.ops import dequantize_weight

    out = {}
    for proj in ("gate_up", "down"):
        full = None
        for g in getattr(weights, proj):
            w = jnp.concatenate(g.w, axis=-1) if isinstance(g.w, tuple) else g.w
            v = jnp.asarray(dequantize_weight(w), jnp.float32)
            if full is None:
                full = jnp.zeros((weights.num_experts, *v.shape[1:]), jnp.float32)
            full = full.at[np.asarray(g.experts)].set(v)
        out[proj] = full
    return out


def uniform_weights(values: dict, scheme):
    """One-group ``ExpertWeights`` of ``values`` in ``scheme`` (bf16 arrays for w16a16)."""
    import jax.numpy as jnp

    from mxmoe_jax.models.moe import ExpertWeights, SchemeGroup
    from mxmoe_jax.quant.packing import pack
    from mxmoe_jax.quant.rtn import quantize_rtn
    from mxmoe_jax.quant.scheme import W16A16

    e = values["gate_up"].shape[0]
    groups = {}
    for proj, v in values.items():
        s = scheme.for_k(v.shape[1])
        w = v.astype(jnp.bfloat16) if s == W16A16 else pack(quantize_rtn(v, s))
        groups[proj] = (SchemeGroup(w=w, experts=tuple(range(e)), scheme=s),)
    return ExpertWeights(gate_up=groups["gate_up"], down=groups["down"], num_experts=e)


def variants(block, schemes) -> dict:
    """``{name: (routed ExpertWeights, shared ExpertWeights | None)}`` of one MoE block."""
    from mxmoe_jax.quant.scheme import W16A16, QScheme

    routed = block.experts.weights()
    shared = block.shared.weights() if hasattr(block, "shared") else None
    vals = stack_values(routed)
    svals = None if shared is None else stack_values(shared)
    out = {"model": (routed, shared)}
    for name, s in [("bf16", W16A16)] + [(n, QScheme.parse(n)) for n in schemes]:
        out[name] = (uniform_weights(vals, s), None if svals is None else
                     uniform_weights(svals, s))
    return out


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_bench(model, cfg, layers, tokens, schemes, *, reference_only: bool, reps: int,
              seed: int, log=print) -> list[dict]:
    """One row per (layer, tokens, variant): device us (None on the reference) and errors."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mxmoe_jax import ops
    from mxmoe_jax.models.moe import jitted_moe_forward
    from mxmoe_jax.perf.timing import device_time_us

    rows = []
    for layer in layers:
        block = model.layers[layer].mlp
        var = variants(block, schemes)
        f, state = jitted_moe_forward(block)  # weights as arguments, not compiled-in constants
        for t in tokens:
            x = jax.random.normal(jax.random.key(seed + t), (t, cfg.hidden_size),
                                  jnp.float32).astype(jnp.bfloat16)
            outs = {}
            for name, (routed, shared) in var.items():
                args = (x, state, routed, shared)
                with ops.kernel_mode("reference"):
                    ref = np.asarray(f(*args), np.float32)
                row = dict(layer=layer, tokens=t, variant=name, us=None,
                           rel_to_reference=None)
                if reference_only:
                    outs[name] = ref
                else:
                    with ops.kernel_mode("kernel"):
                        jaxpr = str(jax.make_jaxpr(f)(*args))
                        got = np.asarray(f(*args), np.float32)
                        row["us"] = round(float(device_time_us(f, *args, n=reps)), 1)
                    row["launches"] = jaxpr.count("pallas_call")
                    row["rel_to_reference"] = _rel(got, ref)
                    outs[name] = got
                rows.append(row)
            for row in rows[-len(var):]:
                row["rel_to_bf16"] = _rel(outs[row["variant"]], outs["bf16"])
                log(_line(row))
    return rows


def _line(row) -> str:
    us = "n/a" if row["us"] is None else f"{row['us']:.1f}"
    ref = "" if row["rel_to_reference"] is None else f"{row['rel_to_reference']:.1e}"
    return (f"| {row['layer']} | {row['tokens']} | {row['variant']} | {us} | "
            f"{row['rel_to_bf16']:.3e} | {ref} |")


def table(rows) -> str:
    head = ("| layer | tokens | variant | device us | rel. diff to bf16 | kernel vs reference |\n"
            "|---|---|---|---|---|---|")
    return "\n".join([head, *(_line(r) for r in rows)])


def chart(rows, path) -> None:
    """Grouped bars: device time per variant, one group per (layer, tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["layer"], r["tokens"]) for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["layer"], r["tokens"], r["variant"]): r["us"] for r in rows}
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4), squeeze=False)
    for ax, (layer, t) in zip(axes[0], keys, strict=True):
        vals = [by.get((layer, t, n)) or 0.0 for n in names]
        ax.bar(range(len(names)), vals, color=["C1" if n == "model" else "C0" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
        ax.set_title(f"layer {layer}, {t} tokens", fontsize=9)
        ax.set_ylabel("device us")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main(args: argparse.Namespace) -> int:
    import datetime
    import sys
    from pathlib import Path

    import jax
    import jax.numpy as jnp

    from mxmoe_jax.jsonio import check_writable, write_json_atomic
    from mxmoe_jax.quantize.checkpoint import is_qmodel_dir, load_any

    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    if not on_gpu and not args.reference:
        raise ValueError(f"bench: no NVIDIA GPU here (JAX device: {dev.platform!r}); the timed "
                         "kernels compile with Triton for NVIDIA GPUs. Pass --reference to run "
                         "the reference path alone (outputs and errors, no times)")
    out = Path(args.out)
    names = ("bench.json", "bench.md", "bench.png")
    if out.exists() and not args.force and any((out / n).exists() for n in names):
        raise ValueError(f"--out: {out} already holds bench results; pass --force to overwrite")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; bench writes a folder (bench.json, bench.md, "
                         "bench.png): choose another --out")
    check_writable(out / "bench.json")  # before the measurement, not after
    cfg, model = load_any(args.model, dtype=jnp.bfloat16)
    layers = _check(args, cfg)
    print(f"bench: {args.model} ({'QMODEL_DIR' if is_qmodel_dir(args.model) else 'MODEL_DIR'}),"
          f" layers {layers}, tokens {args.tokens}, on {dev.device_kind}"
          f"{' (reference only)' if args.reference else ''}", file=sys.stderr)
    print(table([]))
    rows = run_bench(model, cfg, layers, args.tokens, args.schemes,
                     reference_only=args.reference or not on_gpu, reps=args.reps,
                     seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", dict(
        format=BENCH_FORMAT, model=str(args.model), device=dev.device_kind,
        jax=jax.__version__, date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        reference_only=bool(args.reference or not on_gpu), reps=args.reps, rows=rows))
    md = out / "bench.md"
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(table(rows) + "\n")
    tmp.replace(md)
    if any(r["us"] is not None for r in rows):
        chart(rows, out / "bench.png")
    print(f"bench: wrote {out}/bench.json, bench.md"
          f"{', bench.png' if any(r['us'] is not None for r in rows) else ''}", file=sys.stderr)
    return 0
