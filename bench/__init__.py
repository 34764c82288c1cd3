"""Benchmark programs of mxmoe-jax (kernel level: ``python -m bench.gmm``)."""
