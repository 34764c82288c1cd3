"""The measured perf table: run the kernels, read device time, write perf.json (``"measured"``).

``measure_table(shapes, schemes, tokens)`` times, for every model shape's expert GEMMs (gate_up
with SiLU·up in the epilogue, as the model runs it, and down; routed, then shared), every scheme
and every count ``m`` of tokens per expert in ``tokens``, ONE launch of the Pallas grouped GEMM
(``kernels.pallas.gmm``, the dispatcher's own tile and path: ``tuning.choose_tile`` and
``tuning.dequant_first``) over ``experts`` experts holding ``m`` rows each: the model's expert
count, fewer where ``experts * m`` would pass ``MAX_ROWS``. The time is device time from a
``jax.profiler`` trace parsed in-process (``perf.timing.device_time_us``: the sum of the call's GPU
kernels, activation quantization, tile tables and split-K sums included; never host timers).

Why a launch of many experts and not one expert alone: the mixed layer runs all its experts in one
launch, where they share the SMs. ``(time - launch) / experts`` is then one expert's share of the
launch at that load, in both regimes: where the launch is too small to fill the GPU (decode), the
experts stream their weights concurrently and a share is a fraction of that common time; where it
is compute-bound, a share is the expert's SM time over the SMs. ``perf.predict`` sums shares, so
its layer time is linear in the allocation (the MILP's objective) and still accounts for the SMs
being shared, unlike a sum of experts' serial times. ``launch_us`` is measured as one launch with
no rows to compute.

A table records the device (``jax.devices()[0].device_kind``), the JAX version, the date and
``kernel_version()`` (a hash of the kernel sources and tuning tables); ``PerfModel`` warns when one
is used on another device or with other kernels (``--strict``: an error).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import math
import time
from pathlib import Path

from mxmoe_jax.jsonio import PERF_FORMAT as FORMAT
from mxmoe_jax.perf.shapes import MoEShapes
from mxmoe_jax.quant.scheme import QScheme

# tokens per expert of the default grid: geometric, x4, 1 ... 8192
DEFAULT_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
MAX_ROWS = 65536  # rows of one timed launch at most (experts shrink to keep under it)
KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels" / "pallas"


def kernel_version() -> str:
    """``pallas-<12 hex>``: a hash of the kernel sources and tile tables (``kernels/pallas``).

    Any edit to a kernel or its tuning changes it, so a table measured with other kernels is
    recognised as such."""
    h = hashlib.sha256()
    files = sorted([*KERNEL_DIR.glob("*.py"), *KERNEL_DIR.glob("tiles/*.json")])
    if not files:
        raise RuntimeError(f"{KERNEL_DIR}: no kernel sources found")
    for f in files:
        h.update(f.relative_to(KERNEL_DIR).as_posix().encode() + b"\0" + f.read_bytes())
    return "pallas-" + h.hexdigest()[:12]


def current_device() -> str | None:
    """The device kind of the first JAX device when it is an NVIDIA GPU, else None."""
    import jax

    dev = jax.devices()[0]
    return dev.device_kind if dev.platform == "gpu" else None


def _plan(shapes_list: list[MoEShapes], schemes, tokens) -> list[tuple]:
    """(shape, n, k, gated, scheme, m, experts) of every point, and the skipped ones."""
    from kernels.pallas import supports

    plan, skipped = [], []
    for shape in shapes_list:
        d, i, si = shape.hidden, shape.moe_inter, shape.shared_inter
        # (n, k, gate_up?, experts): routed, then the shared expert, timed as one expert (it is
        # one more group of the launch)
        gemms = [(2 * i, d, True, shape.num_experts), (d, i, False, shape.num_experts)]
        if si:
            gemms += [(2 * si, d, True, 1), (d, si, False, 1)]
        seen = set()
        for n, k, gated, e in gemms:
            if (n, k, gated) in seen:
                continue
            seen.add((n, k, gated))
            for name in schemes:
                s = QScheme.parse(name).for_k(k)
                if not supports(s, k):
                    skipped.append({"scheme": s.name, "n": n, "k": k,
                                    "why": f"the kernels do not run it at K={k}"})
                    continue
                for m in tokens:
                    experts = max(1, min(e, MAX_ROWS // max(m, 1)))
                    plan.append((shape, n, k, gated, s, int(m), experts))
    return plan, skipped


def measure_table(shapes_list: list[MoEShapes], schemes, tokens=DEFAULT_TOKENS, *,
                  timer=None, interpret: bool = False, reps: int = 10, seed: int = 0,
                  progress: bool = True) -> dict:
    """The perf.json dict (``"source": "measured"``); see the module docstring.

    ``timer(fn, *args) -> us`` defaults to ``perf.timing.device_time_us`` (GPU only); tests pass
    another with ``interpret=True`` to run the whole procedure on a CPU.
    """
    import jax
    import jax.numpy as jnp

    from kernels.pallas import gmm, tuning
    from mxmoe_jax.quant.packing import pack
    from mxmoe_jax.quant.rtn import quantize_rtn
    from mxmoe_jax.quant.scheme import W16A16

    if timer is None:
        if current_device() is None:
            raise RuntimeError("profile: measuring needs an NVIDIA GPU (this machine has "
                               f"{jax.devices()[0].platform}); use --analytic DEVICE instead")
        from mxmoe_jax.perf.timing import device_time_us

        def timer(fn, *args):
            return float(device_time_us(fn, *args, n=reps))
    tokens = sorted({int(m) for m in tokens})
    if not tokens or tokens[0] < 1:
        raise ValueError(f"tokens: tokens per expert must be >= 1, got {tokens}")
    plan, skipped = _plan(shapes_list, schemes, tokens)
    if not plan:
        raise ValueError("profile: nothing to measure (no scheme runs on these shapes)")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan) + 1, desc="profile", unit="point")
    key = jax.random.key(seed)
    # launch: one bf16 launch whose groups are all empty (its tile table, its programs exiting)
    n0, k0 = shapes_list[0].gemms()[0]
    e0 = shapes_list[0].num_experts
    w0 = jnp.zeros((e0, k0, n0), jnp.bfloat16)
    x0 = jax.random.normal(key, (16, k0), jnp.float32).astype(jnp.bfloat16)
    # weights are arguments of every timed function: closed over, jit compiles them in
    launch_us = timer(jax.jit(functools.partial(gmm, interpret=interpret)), x0, w0,
                      jnp.zeros((e0,), jnp.int32))
    if bar is not None:
        bar.update(1)
    points = []
    weights: dict = {}
    for shape, n, k, gated, s, m, experts in plan:
        wkey = (n, k, experts, s.name)
        if wkey not in weights:
            weights.clear()  # one stack alive at a time
            w = 0.02 * jax.random.normal(jax.random.fold_in(key, n * 7 + k), (experts, k, n))
            weights[wkey] = (w.astype(jnp.bfloat16) if s == W16A16
                             else pack(quantize_rtn(w, s)))
            del w
        wq = weights[wkey]
        rows = experts * m
        x = jax.random.normal(jax.random.fold_in(key, rows), (rows, k),
                              jnp.float32).astype(jnp.bfloat16)
        gs = jnp.full((experts,), m, jnp.int32)
        epilogue = "swiglu" if gated else "none"
        f = jax.jit(functools.partial(gmm, interpret=interpret, epilogue=epilogue))
        t0 = time.perf_counter()
        us = timer(f, x, wq, gs)
        tile = tuning.choose_tile(s, m=rows, e=experts, n=n, k=k)
        df = tuning.dequant_first(s, m=rows, e=experts)
        if df:
            tile = tuning.choose_tile(W16A16, m=rows, e=experts, n=n, k=k)
        if gated:  # as gmm does: SiLU needs the whole K sum
            tile = dataclasses.replace(tile, split_k=1)
        if not math.isfinite(us) or us <= 0:
            raise RuntimeError(f"profile: {s.name} n={n} k={k} m={m}: timer gave {us}")
        points.append({"scheme": s.name, "tile": tile.as_dict(), "m": m, "n": n, "k": k,
                       "experts": experts, "epilogue": epilogue,
                       "path": "dequant_first" if df else "direct",
                       "time_us": round(float(us), 3),
                       "wall_s": round(time.perf_counter() - t0, 2)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{shape.name} {s.name} m={m}")
        del x
    if bar is not None:
        bar.close()
    return {
        "format": FORMAT,
        "source": "measured",
        # an interpret-mode table never carries a GPU's name: it must not pass as that GPU's times
        "device": (f"{jax.devices()[0].platform} (interpret mode)" if interpret
                   else current_device()),
        "jax_version": jax.__version__,
        "kernel_version": kernel_version(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "notes": ("Measured: device time of one launch of `experts` experts with `m` rows each "
                  "(jax.profiler), the dispatcher's tile; an expert's share of a shared launch "
                  "is (time_us - launch_us) / experts."
                  + (" Interpret mode with a test timer: NOT kernel times." if interpret else "")),
        "launch_us": round(float(launch_us), 3),
        "shapes": [dict(name=s.name, hidden=s.hidden, moe_inter=s.moe_inter,
                        num_experts=s.num_experts, top_k=s.top_k, shared_inter=s.shared_inter)
                   for s in shapes_list],
        "tokens": tokens,
        "reps": reps,
        "skipped": skipped,
        "points": points,
    }

