"""Quantization numerics shared by every stage (no model knowledge: ``mxmoe_jax.quantize`` applies
them to models).

Modules: ``scheme`` (QScheme), ``qtensor`` (QuantizedWeight, the canonical grid), ``rtn``,
``act`` (dynamic per-token activation quantization), ``gptq`` (the GPTQ solve and Hessians),
``hadamard`` (Sylvester x Paley matrices), ``rotation`` (QuaRot-style rotation of flat params),
``packing`` (the kernels' layouts).
"""

from mxmoe_jax.quant.act import fake_quant_activations, quantize_activations
from mxmoe_jax.quant.gptq import (
    GPTQConfig,
    gptq_quantize,
    hessian_finalize,
    hessian_init,
    hessian_update,
)
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.rotation import Rotation, rotate_params
from mxmoe_jax.quant.rtn import fake_quant_weight, quantize_rtn
from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES, W16A16, QScheme

__all__ = [
    "GPTQConfig",
    "ORIGINAL_SCHEMES",
    "QScheme",
    "QuantizedWeight",
    "Rotation",
    "W16A16",
    "dequantize",
    "fake_quant_activations",
    "fake_quant_weight",
    "gptq_quantize",
    "hessian_finalize",
    "hessian_init",
    "hessian_update",
    "quantize_activations",
    "quantize_rtn",
    "rotate_params",
]
