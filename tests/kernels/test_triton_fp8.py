"""The FP8 lowering patch: Pallas FP8 dots reach Triton with ``maxNumImpreciseAcc`` set.

Lowers (does not run) a tiny FP8 Pallas kernel for CUDA on the CPU, with the GPU query stubbed,
and reads the Triton IR that Pallas hands to XLA.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from mxmoe_jax.kernels.pallas import _triton_fp8


def test_fp8_dot_gets_imprecise_acc_attribute(triton_ir):
    if not _triton_fp8.ACTIVE:
        pytest.skip("JAX's Pallas-Triton internals changed: the FP8 patch is inactive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as plgpu

    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = jax.lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    f = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                       compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))
    x = jax.ShapeDtypeStruct((64, 32), jnp.float8_e4m3fn)
    ir = triton_ir(f, x, x)[0]
    assert f"maxNumImpreciseAcc = {_triton_fp8.imprecise_acc()}" in ir


def test_imprecise_acc_override(monkeypatch):
    monkeypatch.delenv(_triton_fp8.ENV, raising=False)
    assert _triton_fp8.imprecise_acc() == _triton_fp8.IMPRECISE_ACC
    monkeypatch.setenv(_triton_fp8.ENV, "1073741824")
    assert _triton_fp8.imprecise_acc() == 1 << 30
    for bad in ("abc", "16"):
        monkeypatch.setenv(_triton_fp8.ENV, bad)
        with pytest.raises(ValueError, match=_triton_fp8.ENV):
            _triton_fp8.imprecise_acc()


def test_fp8_dot_accumulates_in_place(triton_ir):
    """``acc + dot(a, b)`` in a K loop becomes ``tt.dot(a, b, acc)`` (no per-step add)."""
    if not _triton_fp8.ACTIVE:
        pytest.skip("JAX's Pallas-Triton internals changed: the FP8 patch is inactive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as plgpu

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            xa = x_ref[:, pl.ds(i * 32, 32)]
            wb = w_ref[:, pl.ds(i * 32, 32)]
            return acc + jax.lax.dot_general(xa, wb, (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        o_ref[...] = jax.lax.fori_loop(0, 4, body, jnp.zeros((64, 64), jnp.float32))

    f = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 64), jnp.float32),
                       compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1))
    x = jax.ShapeDtypeStruct((64, 128), jnp.float8_e4m3fn)
    ir = triton_ir(f, x, x)[0]
    dots = [ln for ln in ir.splitlines() if "tt.dot" in ln]
    # the folded dot takes the loop's carried accumulator (a block argument) as its third operand
    assert any(ln.split("tt.dot")[1].split(",")[2].strip().startswith("%arg") for ln in dots), dots
    assert not any("arith.addf" in ln and "64x64xf32" in ln for ln in ir.splitlines())
