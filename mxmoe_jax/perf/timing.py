"""Device time of a jitted JAX call from ``jax.profiler`` GPU events (the project's only timing).

``device_time_us(fn, *args, n=20, warmup=3)``: runs ``fn`` ``warmup`` times, then traces ``n``
calls, sums the durations of the GPU kernel events (memsets and copies included, host time not)
and divides by ``n``. Host wall-clock carries ~80 us of dispatch per call and is never used.

A timed function must take its weights as arguments: one that closes over more than
``CONSTANTS_LIMIT`` bytes of arrays compiles them into the program as constants (a Qwen1.5-MoE
layer's experts made each compile take 6-20 s on the H200 and the program as large as the
weights), so ``device_time_us`` refuses it with a ``ValueError`` at its first call.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
import warnings

import jax

CONSTANTS_LIMIT = 1 << 20
# JAX's warnings when a jitted function captures constants past jax_captured_constants_warn_bytes
_CAPTURED = re.compile(r"(A large amount of constants were captured|Closed-over constant)")

# lines of the GPU plane that aggregate or annotate kernels, rather than being kernels themselves
_DERIVED = ("XLA Modules", "XLA Ops", "Framework", "Source", "Steps", "TensorFlow", "Launch")


def _gpu_events(path: str) -> list[tuple[str, str, float]]:
    """(line, event name, duration us) of every event on the GPU planes' stream lines."""
    files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise RuntimeError(f"no xplane.pb written under {path}")
    data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
    out = []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if any(line.name.startswith(d) for d in _DERIVED):
                continue
            for ev in line.events:
                out.append((line.name, ev.name, ev.duration_ns / 1e3))
    return out


def device_time_us(fn, *args, n: int = 20, warmup: int = 3, detail: bool = False):
    """Mean device time per call of ``fn(*args)`` in microseconds (see module docstring).

    With ``detail=True`` also returns ``{kernel name: mean us per call}``.
    """
    with no_captured_constants(getattr(fn, "__name__", "the timed function")):
        for _ in range(max(warmup, 1)):
            jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(n):
                out = fn(*args)
            jax.block_until_ready(out)
        events = _gpu_events(tmp)
    if os.environ.get("MXMOE_TIMING_DEBUG"):
        seen: dict[str, int] = {}
        for ln, _, _ in events:
            seen[ln] = seen.get(ln, 0) + 1
        print(f"[timing] GPU lines (events): {seen}", flush=True)
    if not events:
        raise RuntimeError("the trace holds no GPU kernel events (is this a GPU?)")
    # streams can be listed twice (per-stream lines and an all-streams line): keep one kind
    lines = {ln for ln, _, _ in events}
    if len(lines) > 1:
        per_stream = [ln for ln in lines if "Stream" in ln and "All" not in ln] or list(lines)
        events = [e for e in events if e[0] in per_stream]
    total = sum(d for _, _, d in events) / n
    if not detail:
        return total
    by_name: dict[str, float] = {}
    for _, name, d in events:
        by_name[name] = by_name.get(name, 0.0) + d / n
    return total, by_name


@contextlib.contextmanager
def no_captured_constants(what: str, limit: int = CONSTANTS_LIMIT):
    """Inside: lowering a jitted function that captures more than ``limit`` bytes of constants
    raises ``ValueError`` naming ``what`` (the fix: pass those arrays as arguments)."""
    old = jax.config.jax_captured_constants_warn_bytes
    jax.config.update("jax_captured_constants_warn_bytes", limit)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield
        for w in seen:
            if _CAPTURED.search(str(w.message)):
                raise ValueError(
                    f"{what} closes over arrays that jit compiles in as constants (more than "
                    f"{limit} bytes): pass the weights as arguments. JAX said: "
                    f"{str(w.message).splitlines()[0]}")
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        jax.config.update("jax_captured_constants_warn_bytes", old)
