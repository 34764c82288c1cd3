"""The analytic roofline table: predicted time of one expert GEMM per scheme, tile and token count.

Used until the measured profiler exists (and on machines without a GPU). For one GEMM
``[m, k] x [k, n]`` in scheme ``s`` with tile ``(bm, bn, bk, split_k)``:

* programs ``P = ceil(m/bm) * ceil(n/bn) * split_k``, run one per SM in ``waves = ceil(P / SMs)``;
* compute: each program does ``2 * bm * bn * k / split_k`` ops (padded rows and columns count) at
  ``rate / SMs``, where ``rate`` is the matrix unit the scheme runs on: bf16 for weight-only schemes
  (weights dequantize to bf16 in registers), int8 for w8a8 *and* w4a4 (Hopper has no int4 MMA and
  our kernels unpack int4 to int8 on every device), FP8 for ``_fp8``;
* memory: weight bytes (``QScheme.bits_per_weight``: scales and offsets included), activation
  bytes, the bf16 output and, with split_k > 1, the f32 partial sums; weights stream at
  ``hbm * weight_stream_efficiency(s)`` (below), the rest at ``hbm``; bandwidth is capped by the
  busy SMs (``sm_bw_share``), which is why small grids need split-K;
* ``time = launch + max(waves * program_compute, memory) + waves * tile_overhead (+ act quant)``.

``weight_stream_efficiency`` is the measured dequantization penalty of our Pallas kernels
(../shared/BENCHMARKS.md, decode-size weight-only GEMMs on an H200): int4 weights stream at
~1.46 TB/s and int8 at 2.30 TB/s where bf16 streams at 3.97 TB/s, because every dequantized element
passes through registers before the dot. So it is a per-element cost: 3- and 2-bit weights are
modelled with the 4-bit per-element rate (no faster than w4), and w4a4's int4->int8 unpack
likewise (unmeasured).
Activation quantization of WxAy schemes (A < 16) is assumed fused into the previous epilogue: it
costs its bytes (read bf16, write A-bit codes) and no launch.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import math

from mxmoe_jax.jsonio import PERF_FORMAT as FORMAT
from mxmoe_jax.perf.devices import DeviceSpec
from mxmoe_jax.perf.shapes import MoEShapes
from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES, QScheme

# measured on the H200 (BENCHMARKS.md): weight TB/s of each weight format / bf16's 3.97 TB/s
_BF16_STREAM = 3.97
_INT8_STREAM = 2.30  # int8 weights, astype(bf16) before the dot
_INT4_STREAM = 1.46  # int4 weights, mid of 1.44-1.48 (shifts+masks and the bit trick alike)

# Tokens per expert at which the table is evaluated (PerfModel interpolates between them).
DEFAULT_MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Schemes of the default table: the original's calibrated set, bf16, and FP8 where it exists.
DEFAULT_SCHEMES = ("w16a16", *ORIGINAL_SCHEMES, "w8a8_g-1_fp8")
# Candidate tiles (Triton-backend blocks are powers of two).
_BM = (16, 32, 64, 128, 256)
_BN = (32, 64, 128, 256)
_BK = (32, 64, 128, 256)
_SPLIT_K = (1, 2, 4, 8, 16)
_NUM_STAGES = 3
# Points kept per (scheme, m, n, k): the best few tiles (keeps the table small; cost_us takes
# the best)
KEEP_TILES = 3


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TileConfig:
    """A Pallas-Triton tile, with the kernels' field names."""

    bm: int  # tokens per program
    bn: int  # output features per program
    bk: int  # input features per pipeline step
    split_k: int = 1  # programs sharing one output tile along K (f32 atomic adds)
    num_warps: int = 4  # Triton warps per program
    num_stages: int = _NUM_STAGES  # software pipeline depth

    def __post_init__(self):
        for field in ("bm", "bn", "bk", "split_k", "num_warps", "num_stages"):
            v = getattr(self, field)
            if v <= 0 or (field != "num_stages" and v & (v - 1)):
                raise ValueError(f"{field}: must be a positive power of two, got {v}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def weight_stream_efficiency(scheme: QScheme | str) -> float:
    """Fraction of HBM bandwidth the scheme's weights stream at (the dequantization penalty)."""
    s = QScheme.parse(scheme)
    if s.w_bits == 16 or s.fp8 or (s.w_bits == 8 and s.a_bits == 8):
        return 1.0  # bf16 / FP8 / int8 tiles go from shared memory straight into the matrix unit
    if s.w_bits == 8:
        return _INT8_STREAM / _BF16_STREAM  # measured: int8 -> bf16 in registers
    # 4 bits measured; fewer bits cost the same per element, so proportionally less per byte
    return _INT4_STREAM / _BF16_STREAM * s.w_bits / 4


def matrix_rate_tops(device: DeviceSpec, scheme: QScheme) -> float | None:
    """Matrix-unit rate (T ops/s) the scheme's GEMM runs at; None if the device lacks it."""
    if scheme.fp8:
        return device.fp8_tflops
    if scheme.a_bits < 16:
        return device.int8_tops
    return device.bf16_tflops


def _act_bytes(scheme: QScheme) -> float:
    return 2.0 if scheme.a_bits == 16 else scheme.a_bits / 8


def candidate_tiles(scheme: QScheme, k: int, device: DeviceSpec) -> list[TileConfig]:
    """Tiles valid for this scheme, K and device (K split evenly, scale groups whole, smem fits)."""
    out = []
    for bm, bn, bk, split_k in itertools.product(_BM, _BN, _BK, _SPLIT_K):
        if k % (bk * split_k):
            continue
        g = scheme.group_size
        if g > 0 and g % bk and bk % g:
            continue
        smem = _NUM_STAGES * (bm * bk * _act_bytes(scheme) + bk * bn * scheme.w_bits / 8)
        if smem > device.smem_kib * 1024:
            continue
        warps = 4 if bm * bn <= 64 * 64 else 8
        out.append(TileConfig(bm=bm, bn=bn, bk=bk, split_k=split_k, num_warps=warps))
    return out


def gemm_time_us(device: DeviceSpec, scheme: QScheme | str, tile: TileConfig, m: int, n: int,
                 k: int) -> float:
    """Predicted device time (µs) of one [m, k] x [k, n] GEMM; inf if the device lacks the unit."""
    s = QScheme.parse(scheme)
    if m <= 0:
        return 0.0
    rate = matrix_rate_tops(device, s)
    if rate is None:
        return math.inf
    mt, nt = math.ceil(m / tile.bm), math.ceil(n / tile.bn)
    programs = mt * nt * tile.split_k
    waves = math.ceil(programs / device.num_sms)
    # compute: one program's padded tile at its SM's share of the rate (ops per µs = T/s * 1e6)
    prog_ops = 2.0 * tile.bm * tile.bn * (k / tile.split_k)
    t_comp = waves * prog_ops / (rate * 1e6 / device.num_sms)
    # memory (bytes per µs = TB/s * 1e6), capped by how many SMs are busy
    w_bytes = n * k * s.bits_per_weight(k) / 8
    other = m * k * _act_bytes(s) + m * n * 2.0
    if tile.split_k > 1:
        other += m * n * 4.0 * tile.split_k * 2  # f32 partials: read-modify-write per split
    busy = min(1.0, min(programs, device.num_sms) * device.sm_bw_share / device.num_sms)
    bw = device.hbm_tbs * 1e6 * busy
    t_mem = w_bytes / (bw * weight_stream_efficiency(s)) + other / bw
    t_actq = 0.0
    if s.a_bits < 16:  # fused activation quantization: read bf16, write codes + per-token scales
        t_actq = m * k * (2.0 + s.a_bits / 8) / (device.hbm_tbs * 1e6)
    return device.launch_us + max(t_comp, t_mem) + waves * device.tile_us + t_actq


def analytic_table(device: DeviceSpec, shapes: MoEShapes | list[tuple[int, int]],
                   schemes=DEFAULT_SCHEMES, ms=DEFAULT_MS, keep_tiles: int = KEEP_TILES) -> dict:
    """The perf.json dict: for every scheme, (n, k) and m, the ``keep_tiles`` fastest tiles.

    Schemes the device cannot run (FP8 on an A100) and (scheme, k) pairs whose ``group_size`` does
    not divide K are left out and listed in ``skipped``.
    """
    if keep_tiles < 1:
        raise ValueError(f"keep_tiles: must be >= 1, got {keep_tiles}")
    gemms = shapes.gemms() if isinstance(shapes, MoEShapes) else list(shapes)
    names = [QScheme.parse(s).name for s in schemes]
    points, skipped = [], []
    for name, (n, k) in itertools.product(dict.fromkeys(names), gemms):
        s = QScheme.parse(name)
        if matrix_rate_tops(device, s) is None:
            skipped.append({"scheme": name, "n": n, "k": k,
                            "why": f"{device.name} has no FP8 unit"})
            continue
        try:
            s.scale_groups(k)
        except ValueError:
            skipped.append({"scheme": name, "n": n, "k": k,
                            "why": f"group_size {s.group_size} does not divide K={k}"})
            continue
        tiles = candidate_tiles(s, k, device)
        if not tiles:
            skipped.append({"scheme": name, "n": n, "k": k, "why": "no valid tile"})
            continue
        for m in ms:
            timed = sorted((gemm_time_us(device, s, t, m, n, k), i) for i, t in enumerate(tiles))
            for t_us, i in timed[:keep_tiles]:
                points.append({"scheme": name, "tile": tiles[i].to_dict(), "m": int(m), "n": n,
                               "k": k, "time_us": round(t_us, 4)})
    import jax  # only for the version stamp

    return {
        "format": FORMAT,
        "source": "analytic",
        "device": device.name,
        "jax_version": jax.__version__,
        "kernel_version": "analytic-roofline/1",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "notes": ("Analytic roofline, not measured: time = launch + max(compute, memory) + "
                  "waves * tile overhead; weight streaming derated per scheme by the measured "
                  "Pallas dequantization penalty. " + device.source),
        "launch_us": device.launch_us,
        "device_constants": device.to_dict(),
        "weight_stream_efficiency": {n: round(weight_stream_efficiency(n), 4)
                                     for n in dict.fromkeys(names)},
        "shapes": getattr(shapes, "name", None),
        "skipped": skipped,
        "points": points,
    }
