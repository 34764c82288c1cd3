"""Let Pallas-Triton FP8 dots use Hopper's FP8 wgmma (private-API patch, kept in kernels/pallas/).

Pallas builds ``tt.dot`` without ``maxNumImpreciseAcc``, so it is 0, and Triton then refuses MMAv3
for FP8 operands with an f32 result ("cannot accumulate in f32 within the MMA op"): it upcasts both
operands to f16 and runs ``mma.sync`` (seen in the compiled PTX: ``cvt.rn.f16x2.e4m3x2`` +
``mma.sync ... f16``). That is the "slow path" of BENCHMARKS.md (dense Pallas-Triton FP8 at 434
TFLOP/s) and why our FP8 grouped GEMM ran at half the int8 speed. Triton's own frontend defaults
the attribute to 2^30 on sm_90; we set 128: the wgmma accumulator is promoted to a full f32 sum
every 128 K elements (the DeepSeek-V3 recipe), which keeps f32-grade accuracy for long K.

The patch wraps JAX's lowering rule for ``dot_general`` and only touches dots whose operands are
both FP8; if JAX's internals change it does nothing (the kernels stay correct, FP8 stays slow).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax import lax

IMPRECISE_ACC = 128  # K elements accumulated inside the FP8 MMA between f32 promotions
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
    return True


ACTIVE = install()
