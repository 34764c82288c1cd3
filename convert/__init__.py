"""Hugging Face <-> Flax conversion (imported as ``mxmoe_jax.convert``)."""
