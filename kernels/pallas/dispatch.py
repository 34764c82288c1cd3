"""``grouped_matmul``: the scheme-aware grouped GEMM that the models call.

Picks the Pallas kernel on an NVIDIA GPU and the pure-jnp reference elsewhere; ``impl="interpret"``
runs the kernel body in Pallas interpret mode (CPU tests), ``impl="kernel"``/``"reference"`` force
one. The reference is the definition the kernels are tested against: weights dequantized by the
quantization core (``qtensor.dequantize``), activations quantized and dequantized by
``quant.act`` for weight-activation schemes, one f32 ragged matmul, a single cast at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mxmoe_jax.quant import act, packing
from mxmoe_jax.quant.packing import PackedWeight
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.scheme import W16A16, QScheme

from . import grouped_gemm as _gmm
from .tile_config import TileConfig

IMPLS = ("auto", "kernel", "interpret", "reference")


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def grouped_matmul(x: jax.Array, w: PackedWeight | QuantizedWeight | jax.Array,
                   group_sizes: jax.Array, *, scheme: QScheme | str | None = None,
                   tile: TileConfig | None = None, impl: str = "auto") -> jax.Array:
    """``[M, K] x [E, K, N] -> [M, N]`` in ``x``'s dtype, tokens sorted by expert.

    ``w``: bf16/f16 ``[E, K, N]`` (w16a16), a ``PackedWeight`` or a ``QuantizedWeight`` (packed
    here; pack once ahead of time in a model). ``impl``: one of ``IMPLS``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not one of {IMPLS}")
    if isinstance(w, QuantizedWeight):
        w = packing.pack(w)
    if impl == "auto":
        impl = "kernel" if _on_gpu() else "reference"
    if impl == "reference":
        return grouped_matmul_reference(x, w, group_sizes, scheme=scheme)
    return _gmm.gmm(x, w, group_sizes, scheme=scheme, tile=tile, interpret=impl == "interpret")


def grouped_matmul_reference(x: jax.Array, w: PackedWeight | QuantizedWeight | jax.Array,
                             group_sizes: jax.Array, *,
                             scheme: QScheme | str | None = None) -> jax.Array:
    """Pure-jnp definition: dequantize, fake-quantize activations, f32 ragged matmul, cast."""
    if isinstance(w, PackedWeight):
        w = packing.unpack(w)
    if isinstance(w, QuantizedWeight):
        s = w.scheme
        w_f32 = dequantize(w)
    else:
        s = W16A16
        w_f32 = w.astype(jnp.float32)
    if scheme is not None and QScheme.parse(scheme) != s:
        raise ValueError(f"scheme: {QScheme.parse(scheme).name} given but weights are {s.name}")
    xf = x.astype(jnp.float32)
    if not s.weight_only:
        xf = act.dequantize_activations(*act.quantize_activations(x, s))
    out = lax.ragged_dot(xf, w_f32, group_sizes.astype(jnp.int32),
                         precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)
