"""Pallas kernels (Triton backend) with their pure-jnp references (``mxmoe_jax.kernels.pallas``).

Every Triton-specific call of the project lives under this folder. Public API:

* ``grouped_matmul(x, w, group_sizes, *, scheme=None, tile=None, impl="auto")``: the dispatcher
  (kernel on GPU, pure-jnp reference on CPU, or the kernel in interpret mode when asked).
* ``gmm``: the kernel itself; ``gmm_reference``; ``TileConfig``; ``choose_tile``.
* ``quantize_activations``: the activation-quantization kernel.
"""

from .act_quant import quantize_activations
from .dispatch import grouped_matmul, grouped_matmul_reference
from .grouped_gemm import gmm, gmm_reference, make_tiles
from .tile_config import TileConfig
from .tuning import choose_tile

__all__ = [
    "TileConfig", "choose_tile", "gmm", "gmm_reference", "grouped_matmul",
    "grouped_matmul_reference", "make_tiles", "quantize_activations",
]
