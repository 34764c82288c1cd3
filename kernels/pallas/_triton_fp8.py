"""Let Pallas-Triton FP8 dots use Hopper's FP8 wgmma at int8 speed (private-API patch, kept here).

Two things stand between a Pallas FP8 dot and the FP8 tensor cores, both fixed by wrapping JAX's
Pallas-Triton lowering rules (``install``):

1. Pallas builds ``tt.dot`` without ``maxNumImpreciseAcc``, so it is 0, and Triton then refuses
   MMAv3 for FP8 operands with an f32 result: it upcasts both operands to f16 and runs
   ``mma.sync`` (seen in offline PTX: ``cvt.rn.f16x2.e4m3x2`` + ``mma.sync ... f16``), the "slow
   path" of BENCHMARKS.md (dense Pallas-Triton FP8 at 434 TFLOP/s). We set the attribute on dots
   whose operands are both FP8, to Triton's own frontend default on sm_90 (2^30: the wgmma
   accumulator is never flushed to a separate f32 sum).
2. With the attribute set, Triton's combiner no longer folds ``acc + dot(a, b, 0)`` into
   ``dot(a, b, acc)``, so every K step waits for its wgmma and adds the partial in registers. We
   fold it while lowering ``add`` (exact algebra), for the marked dots only.

Measured on the H200 (Qwen1.5-MoE gate+up, 8192 tokens, bench/NOTES.md): 923 us before either fix,
596 us with (1), 448 us with both (int8: 469 us). Accuracy: relative error of the FP8 GEMM against
f32 math on the same FP8 codes 1.9e-3 (6.9e-4 unfolded), far below e4m3's own rounding (~3%).
``MXMOE_FP8_IMPRECISE_ACC=<K>`` sets a flush interval instead (128 measured 517 us, same error).
If JAX's internals change, the patch does nothing (the kernels stay correct, FP8 stays slow).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax import lax

IMPRECISE_ACC = 1 << 30  # K elements accumulated inside the FP8 MMA between f32 flushes
# override (read when a kernel is lowered): MXMOE_FP8_IMPRECISE_ACC=<K elements>
ENV = "MXMOE_FP8_IMPRECISE_ACC"


def imprecise_acc() -> int:
    """K elements per f32 promotion of FP8 wgmma accumulators (``ENV`` overrides the default)."""
    raw = os.environ.get(ENV)
    if raw is None:
        return IMPRECISE_ACC
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected a positive integer") from None
    if value < 32:
        raise ValueError(f"{ENV}={value}: must be >= 32 (Triton needs it for FP8 wgmma)")
    return value
_FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)


def install() -> bool:
    """Wrap the Triton lowering of ``dot_general`` once; returns whether the patch is active."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton import lowering as tl
    except ImportError:  # pragma: no cover - depends on JAX internals
        return False
    rules = getattr(tl, "triton_lowering_rules", None)
    if rules is None or lax.dot_general_p not in rules:  # pragma: no cover
        return False
    orig = rules[lax.dot_general_p]
    if getattr(orig, "_mxmoe_fp8", False):
        return True

    def rule(ctx, a, b, **params):
        out = orig(ctx, a, b, **params)
        if all(av.dtype in _FP8 for av in ctx.avals_in):
            op = getattr(out, "owner", None)
            op = getattr(op, "operation", op)  # OpView -> Operation
            if getattr(op, "name", "") == "tt.dot":
                op.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(
                    ir.IntegerType.get_signless(32), imprecise_acc())
        return out

    rule._mxmoe_fp8 = True
    rules[lax.dot_general_p] = rule
    _install_add_fold(rules, ir)
    return True


def _zero_splat(value) -> bool:
    """Whether ``value`` is ``tt.splat`` of an ``arith.constant`` zero (Pallas' dot accumulator)."""
    op = getattr(value.owner, "operation", value.owner)
    if getattr(op, "name", "") != "tt.splat":
        return False
    const = getattr(op.operands[0].owner, "operation", op.operands[0].owner)
    if getattr(const, "name", "") != "arith.constant":
        return False
    text = str(const.attributes["value"])  # e.g. "0.000000e+00 : f32"
    try:
        return float(text.split(":")[0]) == 0.0
    except ValueError:
        return False


def _install_add_fold(rules, ir) -> None:
    """Fold ``acc + dot(a, b, 0)`` into ``dot(a, b, acc)`` for the FP8 dots marked above.

    Pallas lowers every dot with a zero accumulator and leaves the ``+ acc`` to Triton's combiner,
    which refuses the fold for float dots with ``maxNumImpreciseAcc`` set. Unfolded, each K step
    waits for its wgmma and adds the partial in registers: on the H200 the FP8 kernel ran at 549 us
    against int8's 413 us with the same wgmma count (bench/NOTES.md). The fold is exact algebra
    (``dot(a, b, 0) + acc == dot(a, b, acc)``); it applies only to dots carrying our attribute.
    """
    from jax._src.lib import triton as triton_lib

    tt = triton_lib.dialect
    orig = rules.get(lax.add_p)
    if orig is None or getattr(orig, "_mxmoe_fp8", False):
        return

    def fp8_dot(value):
        op = getattr(value.owner, "operation", value.owner)
        if getattr(op, "name", "") != "tt.dot" or "maxNumImpreciseAcc" not in op.attributes:
            return None
        if not _zero_splat(op.operands[2]):
            return None
        return op

    def add(ctx, x, y, **params):
        for acc, d in ((x, y), (y, x)):
            op = fp8_dot(d) if hasattr(d, "owner") else None
            if op is not None and acc.type == d.type:
                out = tt.dot(op.operands[0], op.operands[1], acc)
                new = getattr(out.owner, "operation", out.owner)
                for name in ("maxNumImpreciseAcc", "inputPrecision"):
                    if name in op.attributes:
                        new.attributes[name] = op.attributes[name]
                return out
        return orig(ctx, x, y, **params)

    add._mxmoe_fp8 = True
    rules[lax.add_p] = add


ACTIVE = install()
