"""Kernel cost tables: the analytic roofline (`profile --analytic`) and the `PerfModel` lookup."""

from mxmoe_jax.perf.analytic import (
    DEFAULT_MS,
    DEFAULT_SCHEMES,
    TileConfig,
    analytic_table,
    gemm_time_us,
    weight_stream_efficiency,
)
from mxmoe_jax.perf.devices import DEVICES, DeviceSpec, get_device
from mxmoe_jax.perf.model import PerfModel
from mxmoe_jax.perf.shapes import PRESETS, MoEShapes, load_shapes, shapes_from_hf_config

__all__ = [
    "DEFAULT_MS", "DEFAULT_SCHEMES", "DEVICES", "PRESETS", "DeviceSpec", "MoEShapes", "PerfModel",
    "TileConfig", "analytic_table", "gemm_time_us", "get_device", "load_shapes",
    "shapes_from_hf_config", "weight_stream_efficiency",
]
