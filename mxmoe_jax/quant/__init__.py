"""Quantization numerics shared by every stage: schemes, quantizers, packing."""

from mxmoe_jax.quant.act import fake_quant_activations, quantize_activations
from mxmoe_jax.quant.qtensor import QuantizedWeight, dequantize
from mxmoe_jax.quant.rtn import fake_quant_weight, quantize_rtn
from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES, W16A16, QScheme

__all__ = [
    "ORIGINAL_SCHEMES",
    "QScheme",
    "QuantizedWeight",
    "W16A16",
    "dequantize",
    "fake_quant_activations",
    "fake_quant_weight",
    "quantize_activations",
    "quantize_rtn",
]
