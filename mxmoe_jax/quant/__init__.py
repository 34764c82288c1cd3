"""Quantization numerics shared by every stage: schemes, quantizers, packing."""

from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES, W16A16, QScheme

__all__ = ["ORIGINAL_SCHEMES", "QScheme", "W16A16"]
