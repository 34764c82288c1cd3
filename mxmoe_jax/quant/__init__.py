"""Quantization numerics shared by every stage: schemes, quantizers, rotation, fake-quant forward.

Modules: ``scheme`` (QScheme), ``qtensor`` (QuantizedWeight, the canonical grid), ``rtn``,
``act`` (dynamic per-token activation quantization), ``gptq`` (the GPTQ solve and Hessians),
``model_gptq`` (GPTQ of a whole model under a plan), ``hadamard`` (Sylvester x Paley matrices),
``rotation`` (QuaRot-style rotation of flat params), ``fakequant`` (plans and the reference
forward), ``packing`` (the kernels' layouts).
"""

from mxmoe_jax.quant.act import fake_quant_activations, quantize_activations
from mxmoe_jax.quant.fakequant import (
    QuantPlan,
    fake_quantize_params,
    make_quant_forward,
    quant_forward,
)
from mxmoe_jax.quant.gptq import (
    GPTQConfig,
    gptq_quantize,
    hessian_finalize,
    hessian_init,
    hessian_update,
)
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.rotation import Rotation, rotate_model, rotate_params
from mxmoe_jax.quant.rtn import fake_quant_weight, quantize_rtn
from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES, W16A16, QScheme

__all__ = [
    "GPTQConfig",
    "ORIGINAL_SCHEMES",
    "QScheme",
    "QuantPlan",
    "QuantizedWeight",
    "Rotation",
    "W16A16",
    "dequantize",
    "fake_quant_activations",
    "fake_quant_weight",
    "fake_quantize_params",
    "gptq_quantize",
    "hessian_finalize",
    "hessian_init",
    "hessian_update",
    "make_quant_forward",
    "quant_forward",
    "quantize_activations",
    "quantize_rtn",
    "rotate_model",
    "rotate_params",
]
