"""One Qwen1.5-MoE-sized MoE block on the GPU: the models' ops path "reference" vs "kernel".

``python -m bench.model_layer [--tokens 32 1024 8192] [--paths reference kernel] [--no-backward]``

The block is ``mxmoe_jax.models.moe.MoEBlock`` (router, top-4 of 60 experts, SwiGLU experts
``[60, 2048, 1408]`` through ``mxmoe_jax.ops.grouped_matmul``, the gated shared expert of width
5632), bf16 params drawn from its normal(0.02) init, random normal bf16 inputs (so routing is
close to uniform over the experts). For each token count and ops path (``ops.kernel_mode``:
``reference`` = XLA ``lax.ragged_dot``, ``kernel`` = the Pallas grouped GEMM with the reference's
VJP) it measures the device time of the jitted forward and of forward + backward (``jax.grad`` of
the sum of the outputs w.r.t. all params and the input), from ``jax.profiler`` GPU events
(``perf.timing.device_time_us``; all kernels of the call, router, sort and shared expert too).
It also checks the two paths against each other: the largest difference of the forward outputs
relative to the largest reference output.

The kernel path's backward runs Pallas too (``mxmoe_jax.ops``: dx by the forward kernel on
transposed weights, dw by ``tgmm``); ``ops.kernel_backward("reference")`` gives it the
reference's VJP (XLA ragged_dot transposes, f32 GEMMs over every expert) for comparison.

Prints a table and writes ``bench/results/model_layer-<date>.json`` (date, device, JAX version,
shape, rows). Needs an NVIDIA GPU: elsewhere it stops with an error (the kernel is Triton).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

from mxmoe_jax.perf.shapes import PRESETS


def layer_shape(preset: str) -> dict:
    """A model preset's MoE layer (``mxmoe_jax.perf.shapes.PRESETS``) as the benches' shape dict
    (the keys of their result files)."""
    s = PRESETS[preset]
    return dict(hidden=s.hidden, experts=s.num_experts, topk=s.top_k, inter=s.moe_inter,
                shared=s.shared_inter)


SHAPE = layer_shape("qwen1.5-moe")  # Qwen1.5-MoE-A2.7B's MoE layer
TOKENS = (32, 1024, 8192)
PATHS = ("reference", "kernel")


def qwen_moe_config(shape: dict, *, shared: bool = True):
    """A one-layer qwen2_moe config with the block's shape (only the MoE fields matter)."""
    from mxmoe_jax.config import ModelConfig

    return ModelConfig(
        model_type="qwen2_moe", vocab_size=1024, hidden_size=shape["hidden"], num_layers=1,
        num_heads=16, num_kv_heads=16, head_dim=shape["hidden"] // 16, rms_norm_eps=1e-6,
        rope_theta=1e6, num_experts=shape["experts"], num_experts_per_tok=shape["topk"],
        moe_intermediate_size=shape["inter"], intermediate_size=4 * shape["inter"],
        shared_intermediate_size=shape["shared"] if shared else 0,
        shared_expert_gate=shared, norm_topk_prob=False)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m bench.model_layer",
                                     description=__doc__.split("\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS),
                   help="token counts (rows entering the block)")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS,
                   help="ops paths to time (ops.kernel_mode)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--no-shared", action="store_true", help="leave out the shared expert")
    p.add_argument("--reps", type=int, default=20, help="traced calls per timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detail", action="store_true",
                   help="also record the 6 costliest kernels of each timing")
    p.add_argument("--out", type=Path, default=Path("bench/results"),
                   help="folder of the JSON result")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    return p


def _check_args(args) -> None:
    if not args.tokens or any(t < 1 for t in args.tokens):
        raise ValueError(f"--tokens: need positive token counts, got {args.tokens}")
    if args.reps < 1:
        raise ValueError(f"--reps: must be >= 1, got {args.reps}")


def _require_gpu():
    import jax

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        raise ValueError(f"bench model_layer: needs an NVIDIA GPU (the Pallas kernel compiles "
                         f"with Triton); this machine's JAX device is {dev.platform!r}")
    return dev


def _timed(fn, args, reps: int, detail: bool):
    """(us, top kernels or None) of ``fn(*args)``; device time from the profiler."""
    from mxmoe_jax.perf.timing import device_time_us

    if not detail:
        return device_time_us(fn, *args, n=reps), None
    us, by_name = device_time_us(fn, *args, n=reps, detail=True)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
    return us, {name: round(v, 1) for name, v in top}


def run(tokens_list, paths, *, backward: bool = True, shared: bool = True, reps: int = 20,
        seed: int = 0, detail: bool = False, log=print) -> list[dict]:
    """One row per (tokens, path): forward and forward+backward device us (see module doc)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mxmoe_jax import ops
    from mxmoe_jax.models.moe import MoEBlock

    cfg = qwen_moe_config(SHAPE, shared=shared)
    block = MoEBlock(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(seed))
    graph, params = nnx.split(block)

    def forward(p, x):
        return nnx.merge(graph, p)(x)

    def loss(p, x):
        return jnp.sum(forward(p, x).astype(jnp.float32))

    rows = []
    for t in tokens_list:
        x = jax.random.normal(jax.random.key(seed + t), (t, SHAPE["hidden"]),
                              jnp.float32).astype(jnp.bfloat16)
        outs = {}
        for path in paths:
            row = dict(tokens=t, path=path)
            # the mode is part of jit's cache key: calls inside the context trace that path
            with ops.kernel_mode(path):
                fwd = jax.jit(forward)
                try:
                    outs[path] = np.asarray(fwd(params, x), np.float32)
                    row["fwd_us"], row["fwd_top"] = _timed(fwd, (params, x), reps, detail)
                except Exception as err:  # noqa: BLE001 - one failure must not stop the rest
                    row["fwd_error"] = f"{type(err).__name__}: {err}"[:300]
                if backward:
                    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
                    try:
                        row["fwd_bwd_us"], row["fwd_bwd_top"] = _timed(grad, (params, x), reps,
                                                                      detail)
                    except Exception as err:  # noqa: BLE001
                        row["fwd_bwd_error"] = f"{type(err).__name__}: {err}"[:300]
            if not detail:
                row.pop("fwd_top", None)
                row.pop("fwd_bwd_top", None)
            rows.append(row)
            log(f"tokens {t:5d} {path:9s} " + "  ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items() if k not in ("tokens", "path", "fwd_top", "fwd_bwd_top")))
        if "reference" in outs and "kernel" in outs:
            ref = outs["reference"]
            err = float(np.abs(outs["kernel"] - ref).max() / max(np.abs(ref).max(), 1e-30))
            for row in rows[-len(paths):]:
                row["fwd_max_rel_diff_kernel_vs_reference"] = err
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table: per token count, each path's times and the kernel's speed-up."""
    by = {(r["tokens"], r["path"]): r for r in rows}
    tokens = sorted({r["tokens"] for r in rows})
    paths = [p for p in PATHS if any(r["path"] == p for r in rows)]

    def f(v):
        return "err" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "" if a is None or b is None else f"{a / b:.2f}x"

    head = "| tokens |" + "".join(f" fwd {p} us |" for p in paths)
    head += "".join(f" fwd+bwd {p} us |" for p in paths)
    both = set(paths) == set(PATHS)
    if both:
        head += " fwd speed-up | fwd+bwd speed-up | fwd max rel diff |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in tokens:
        r = {p: by[(t, p)] for p in paths}
        line = f"| {t} |" + "".join(f" {f(r[p].get('fwd_us'))} |" for p in paths)
        line += "".join(f" {f(r[p].get('fwd_bwd_us'))} |" for p in paths)
        if both:
            ref, ker = r["reference"], r["kernel"]
            d = ker.get("fwd_max_rel_diff_kernel_vs_reference")
            line += (f" {ratio(ref.get('fwd_us'), ker.get('fwd_us'))} |"
                     f" {ratio(ref.get('fwd_bwd_us'), ker.get('fwd_bwd_us'))} |"
                     f" {'' if d is None else f'{d:.2e}'} |")
        lines.append(line)
    return "\n".join(lines)


def main(args) -> int:
    _check_args(args)
    dev = _require_gpu()
    import jax

    from mxmoe_jax.jsonio import write_json_atomic

    t0 = time.time()
    print(f"device: {dev.device_kind}; JAX {jax.__version__}; block E={SHAPE['experts']} "
          f"D={SHAPE['hidden']} I={SHAPE['inter']} top-{SHAPE['topk']} shared="
          f"{0 if args.no_shared else SHAPE['shared']}; bf16", flush=True)
    rows = run(args.tokens, args.paths, backward=not args.no_backward,
               shared=not args.no_shared, reps=args.reps, seed=args.seed, detail=args.detail,
               log=lambda s: print(s, flush=True))
    date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H%MZ")
    result = dict(bench="model_layer", date=date, device=dev.device_kind, jax=jax.__version__,
                  shape={**SHAPE, "shared": 0 if args.no_shared else SHAPE["shared"]},
                  dtype="bfloat16", reps=args.reps, seed=args.seed,
                  timing="mxmoe_jax.perf.timing.device_time_us (jax.profiler GPU events, per call)",
                  rows=rows, seconds=round(time.time() - t0, 1))
    stem = f"model_layer-{date}{'-' + args.tag if args.tag else ''}"
    path = write_json_atomic(args.out / f"{stem}.json", result)
    print(table(rows))
    print(f"wrote {path}")
    failed = [r for r in rows if "fwd_error" in r or "fwd_bwd_error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    _args = build_parser().parse_args()
    try:
        sys.exit(main(_args))
    except ValueError as _err:
        print(f"error: {_err}", file=sys.stderr)
        sys.exit(2)
