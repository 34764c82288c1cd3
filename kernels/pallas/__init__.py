"""Pallas kernels (Triton backend) with their pure-jnp references (``mxmoe_jax.kernels.pallas``).

Every Triton-specific call of the project lives under this folder. Public API:

* ``gmm``: the grouped-GEMM kernel itself, for every scheme; ``supports``; ``TileConfig``;
  ``choose_tile``. Models call it through ``mxmoe_jax.ops.grouped_matmul``, which picks the
  kernel or the reference by the weight's type and holds the one reference.
* ``mixed_grouped_matmul`` / ``mixed_launch``: one launch for experts in several schemes (and
  several grouped GEMMs, e.g. routed + shared experts); ``ops.grouped_matmul_by_scheme`` calls it.
* ``quantize_activations``: the activation-quantization kernel.
"""

from .act_quant import quantize_activations
from .grouped_gemm import gmm, make_tiles, supports
from .mixed_gemm import mixed_grouped_matmul, mixed_launch
from .tile_config import TileConfig
from .tuning import choose_tile

__all__ = ["TileConfig", "choose_tile", "gmm", "make_tiles", "mixed_grouped_matmul", "mixed_launch",
           "quantize_activations", "supports"]
