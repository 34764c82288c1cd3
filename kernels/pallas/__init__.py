"""Pallas kernels (Triton backend) with their pure-jnp references (``mxmoe_jax.kernels.pallas``).

Every Triton-specific call of the project lives under this folder.
"""
