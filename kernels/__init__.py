"""GPU kernels of mxmoe-jax (imported as ``mxmoe_jax.kernels``)."""
