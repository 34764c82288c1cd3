"""Device constants for the analytic roofline table (`mxmoe-jax profile --analytic DEVICE`).

Every figure is either a datasheet number (cited beside it) or a measurement from
``../shared/BENCHMARKS.md`` (one H200, JAX 0.11.2, Pallas-Triton, 2026-11-29), and each device
records which. Datasheet peaks are never reached by our kernels, so datasheet devices are derated
by the achieved/peak ratios measured on the H200 (same Hopper SM; for Ampere and Ada this is an
assumption, stated in ``source``). The measured table (`profile` on a GPU) replaces all of this.

Glossary: *launch* = one kernel launch (fixed cost); *program* / *tile* = one Pallas grid step,
which computes a [bm, bn] output tile over K / split_k; *wave* = one round of programs over all SMs.
"""

from __future__ import annotations

import dataclasses

from mxmoe_jax.gpus import GPU, GPUS


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSpec:
    """Throughput ceilings and fixed costs of one GPU, as the analytic model uses them."""

    name: str  # preset key, also written to perf.json "device"
    hbm_tbs: float  # achievable HBM bandwidth, TB/s
    bf16_tflops: float  # achievable dense bf16 matrix rate (f32 accumulate), TFLOP/s
    int8_tops: float  # achievable dense int8 matrix rate (int32 accumulate), TOP/s
    fp8_tflops: float | None  # achievable dense FP8 E4M3 rate; None = no FP8 matrix unit
    # num_sms and smem_kib: the datasheet's, from mxmoe_jax.gpus
    num_sms: int  # streaming multiprocessors (programs run one per SM in the model)
    smem_kib: int  # shared memory one program may use, KiB (tiles that need more are skipped)
    launch_us: float  # fixed device time of one kernel launch, µs
    tile_us: float  # fixed cost of one program (pipeline fill + epilogue store), µs, paid per wave
    sm_bw_share: float  # one SM can pull this many times its 1/num_sms share of HBM bandwidth
    measured: bool  # True: ceilings measured on this device; False: datasheet x derating
    source: str  # where the numbers come from, written to perf.json

    def __post_init__(self):
        for field in ("hbm_tbs", "bf16_tflops", "int8_tops", "launch_us", "tile_us", "sm_bw_share"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field}: must be positive, got {getattr(self, field)}")
        if self.fp8_tflops is not None and self.fp8_tflops <= 0:
            raise ValueError("fp8_tflops: must be positive or None")
        if self.num_sms <= 0 or self.smem_kib <= 0:
            raise ValueError("num_sms, smem_kib: must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- measured on one H200 (../shared/BENCHMARKS.md, "Ceilings measured on this GPU") -----------
# bf16 weights, M=16, K=N=16384, split-K 8 (an HBM read-sum reached 3.5, a copy 4.3)
_H200_PALLAS_BF16_STREAM_TBS = 3.97
_H200_PALLAS_BF16_TFLOPS = 604.0  # Pallas-Triton bf16 8192^3, 128x256x64 (XLA: 639)
_H200_PALLAS_INT8_TOPS = 1000.0  # Pallas-Triton int8 8192^3, K-major B (XLA: 1109)
_H200_PALLAS_FP8_TFLOPS = 434.0  # Pallas-Triton fp8 8192^3: a slow path today (XLA: 1128)

# -- H200 SXM datasheet (NVIDIA H200 Tensor Core GPU datasheet, 2024): 4.8 TB/s HBM3e, dense
# (no sparsity) 989 TFLOP/s bf16, 1979 TOP/s int8, 1979 TFLOP/s FP8 (SMs and smem: mxmoe_jax.gpus).
_H200_SHEET = dict(hbm_tbs=4.8, bf16=989.0, int8=1979.0, fp8=1979.0)

# Achieved / datasheet on the H200: how far Pallas-Triton gets on a Hopper SM. Applied to the other
# devices' datasheet peaks (an assumption for Ampere and Ada until they are measured).
DERATE = dict(
    hbm=_H200_PALLAS_BF16_STREAM_TBS / _H200_SHEET["hbm_tbs"],  # 0.83
    bf16=_H200_PALLAS_BF16_TFLOPS / _H200_SHEET["bf16"],  # 0.61
    int8=_H200_PALLAS_INT8_TOPS / _H200_SHEET["int8"],  # 0.51
    fp8=_H200_PALLAS_FP8_TFLOPS / _H200_SHEET["fp8"],  # 0.22 (Pallas FP8 slow path, to be fixed)
)

# Fixed costs: not yet measured on any device (assumptions, replaced by the measured table). A
# Triton launch costs a few µs of device time; each program pays about one HBM round trip before its
# pipeline is full plus its epilogue store.
_LAUNCH_US = 4.0
_TILE_US = 0.7
# One SM can draw about twice its fair share of HBM bandwidth: so about half the SMs busy are needed
# to saturate HBM (why a 64-program w4a16 GEMV streamed at 0.07 TB/s, BENCHMARKS.md).
_SM_BW_SHARE = 2.0


def _derated(gpu: GPU, *, hbm_tbs, bf16, int8, fp8, cite) -> DeviceSpec:
    return DeviceSpec(
        name=gpu.name, hbm_tbs=hbm_tbs * DERATE["hbm"], bf16_tflops=bf16 * DERATE["bf16"],
        int8_tops=int8 * DERATE["int8"], fp8_tflops=None if fp8 is None else fp8 * DERATE["fp8"],
        num_sms=gpu.num_sms, smem_kib=gpu.smem_kib, launch_us=_LAUNCH_US, tile_us=_TILE_US,
        sm_bw_share=_SM_BW_SHARE, measured=False,
        source=f"datasheet ({cite}) x achieved/peak ratios measured on an H200 "
               f"(hbm {DERATE['hbm']:.2f}, bf16 {DERATE['bf16']:.2f}, int8 {DERATE['int8']:.2f}, "
               f"fp8 {DERATE['fp8']:.2f}); launch/tile overheads assumed")


DEVICES: dict[str, DeviceSpec] = {
    "H200": DeviceSpec(
        name="H200", hbm_tbs=_H200_PALLAS_BF16_STREAM_TBS, bf16_tflops=_H200_PALLAS_BF16_TFLOPS,
        int8_tops=_H200_PALLAS_INT8_TOPS, fp8_tflops=_H200_PALLAS_FP8_TFLOPS,
        num_sms=GPUS["H200"].num_sms, smem_kib=GPUS["H200"].smem_kib, launch_us=_LAUNCH_US,
        tile_us=_TILE_US, sm_bw_share=_SM_BW_SHARE, measured=True,
        source="measured on one H200 with Pallas-Triton (../shared/BENCHMARKS.md, 2026-11-29): "
               "bf16 weight stream 3.97 TB/s, bf16 604 TFLOP/s, int8 1000 TOP/s, fp8 434 TFLOP/s; "
               "launch/tile overheads assumed"),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 3.35 TB/s HBM3, dense 989 TFLOP/s bf16,
    # 1979 TOP/s int8, 1979 TFLOP/s FP8 (SMs and smem of every device: mxmoe_jax.gpus).
    "H100": _derated(GPUS["H100"], hbm_tbs=3.35, bf16=989.0, int8=1979.0, fp8=1979.0,
                     cite="NVIDIA H100 SXM5 datasheet"),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 2.039 TB/s HBM2e, dense 312 TFLOP/s bf16,
    # 624 TOP/s int8, no FP8.
    "A100": _derated(GPUS["A100"], hbm_tbs=2.039, bf16=312.0, int8=624.0, fp8=None,
                     cite="NVIDIA A100 SXM4 80GB datasheet"),
    # NVIDIA Ada Lovelace GPU architecture whitepaper, RTX 4090: 1.008 TB/s GDDR6X, dense
    # 165.2 TFLOP/s bf16 with f32 accumulate, 660.6 TOP/s int8, 330.3 TFLOP/s FP8 with f32
    # accumulate.
    "RTX4090": _derated(GPUS["RTX4090"], hbm_tbs=1.008, bf16=165.2, int8=660.6, fp8=330.3,
                        cite="NVIDIA Ada Lovelace architecture whitepaper, RTX 4090"),
}

_ALIASES = {"H100-SXM": "H100", "A100-80GB": "A100", "A100-SXM": "A100", "RTX-4090": "RTX4090",
            "4090": "RTX4090"}


def get_device(name: str) -> DeviceSpec:
    """A preset by name (case-insensitive; ``RTX 4090``, ``rtx4090`` and ``4090`` all work)."""
    key = name.strip().upper().replace(" ", "").replace("_", "-")
    key = _ALIASES.get(key, key).replace("-", "")
    for preset in DEVICES:
        if preset.upper() == key:
            return DEVICES[preset]
    raise ValueError(f"device {name!r}: unknown; choose one of {', '.join(DEVICES)}")
