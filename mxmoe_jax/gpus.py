"""Datasheet facts of the NVIDIA GPUs the project knows: SM count and shared memory per block.

The one table that the kernels' tile choice (``kernels/pallas/tuning.py``, by JAX device kind) and
the analytic cost model (``perf/devices.py``, by preset name) both read, at the bottom of the
layering: it imports nothing of the project. Throughputs (measured or derated) stay in
``perf/devices.py``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GPU:
    name: str  # preset key (perf.json "device")
    # jax.Device.device_kind, lower case, spaces and dashes as underscores (the kernels' tile
    # tables are named so: tiles/nvidia_h200.json)
    device_kinds: tuple[str, ...]
    num_sms: int  # streaming multiprocessors
    smem_kib: int  # shared memory one thread block may use, KiB
    source: str  # the datasheet


GPUS: dict[str, GPU] = {
    "H200": GPU(name="H200", device_kinds=("nvidia_h200",), num_sms=132, smem_kib=227,
                source="NVIDIA H200 Tensor Core GPU datasheet (2024): 132 SMs, 228 KiB smem/SM"),
    "H100": GPU(name="H100", device_kinds=("nvidia_h100_80gb_hbm3",), num_sms=132, smem_kib=227,
                source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): 132 SMs, 228 KiB smem/SM "
                       "(227 per block)"),
    "A100": GPU(name="A100", device_kinds=("nvidia_a100_sxm4_80gb",), num_sms=108, smem_kib=163,
                source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 108 SMs, 164 KiB "
                       "smem/SM (163 per block)"),
    "RTX4090": GPU(name="RTX4090", device_kinds=("nvidia_geforce_rtx_4090",), num_sms=128,
                   smem_kib=99,
                   source="NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4090: 128 SMs, "
                          "100 KiB smem/SM (99 per block)"),
}

# device kind (as above) -> SMs
NUM_SMS_BY_KIND: dict[str, int] = {
    kind: gpu.num_sms for gpu in GPUS.values() for kind in gpu.device_kinds}
