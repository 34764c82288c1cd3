"""Tile configs per scheme and shape, and the rule that picks one (tuned tables are data).

``choose_tile(scheme, m, e, n, k, device)`` looks up ``tiles/<device>.json`` (device name with
spaces as underscores, lower case, e.g. ``nvidia_h200.json``): a list of entries
``{"kind": ..., "w_bits": ..., "max_m_per_expert": ..., "min_m_per_expert": ..., "tile": {...}}``
(TileConfig fields; ``w_bits`` and the bounds optional) tried in order; the first whose kind (and
weight bits) match and whose bounds hold wins. Kinds: ``bf16``,
``wonly`` (weight-only sub-byte and w8), ``int`` (w8a8/w4a8/w4a4), ``fp8``. Without a table entry a
heuristic applies: one 16-row tile and split-K up to ~4 programs per SM for decode-size groups,
64 or 128-row tiles without split-K for large groups. ``split_k`` from the table is a maximum:
it is reduced so that each split keeps at least two K steps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax

from mxmoe_jax.gpus import NUM_SMS_BY_KIND
from mxmoe_jax.quant.scheme import QScheme

from .tile_config import TileConfig

_TABLES = Path(__file__).resolve().parent / "tiles"


def kind_of(scheme: QScheme) -> str:
    if scheme.w_bits == 16:
        return "bf16"
    if scheme.fp8:
        return "fp8"
    return "wonly" if scheme.weight_only else "int"


def device_name() -> str:
    dev = jax.devices()[0]
    name = getattr(dev, "device_kind", dev.platform)
    return name.lower().replace(" ", "_").replace("-", "_")


@functools.cache
def load_table(device: str) -> tuple[dict, ...]:
    path = _TABLES / f"{device}.json"
    if not path.is_file():
        return ()
    return tuple(json.loads(path.read_text())["entries"])


def matches(entry: dict, scheme: QScheme, mpe: float) -> bool:
    """Whether a table entry applies: kind, optional ``w_bits``, and the rows-per-expert bounds."""
    return (entry["kind"] == kind_of(scheme)
            and entry.get("w_bits", scheme.w_bits) == scheme.w_bits
            and entry.get("min_m_per_expert", 0) <= mpe <= entry.get("max_m_per_expert",
                                                                     float("inf")))


def _heuristic(kind: str, mpe: float) -> TileConfig:
    if mpe <= 16:
        return TileConfig(bm=16, bn=128 if kind != "bf16" else 64, bk=128, split_k=8,
                          num_warps=4, num_stages=4)
    if mpe <= 64:
        return TileConfig(bm=64, bn=128, bk=64 if kind == "bf16" else 128, split_k=2,
                          num_warps=4, num_stages=4)
    if kind in ("int", "fp8"):
        return TileConfig(bm=128, bn=128, bk=128, split_k=1, num_warps=8, num_stages=3)
    return TileConfig(bm=128, bn=128, bk=64, split_k=1, num_warps=8, num_stages=3)


def _steps(scheme: QScheme, tile: TileConfig, k: int) -> int:
    step = 128 if (scheme.w_bits != 16 and (scheme.w_bits < 8 or scheme.group_size != -1)) \
        else tile.bk
    return -(-k // step)


def choose_tile(scheme: QScheme, *, m: int, e: int, n: int, k: int,
                device: str | None = None) -> TileConfig:
    """Pick a tile for ``m`` routed rows over ``e`` experts of ``[K, N]`` weights."""
    scheme = QScheme.parse(scheme)
    kind = kind_of(scheme)
    mpe = m / max(e, 1)
    device = device or device_name()
    tile = None
    for entry in load_table(device):
        if matches(entry, scheme, mpe):
            tile = TileConfig(**entry["tile"])
            break
    if tile is None:
        tile = _heuristic(kind, mpe)
    if tile.group_m == 1 and -(-n // tile.bn) > GROUP_M_MIN_BLOCKS and mpe >= tile.bm:
        # many column blocks: with column blocks fastest, each m-tile streams the whole expert
        # (H200, Mixtral 8192 tokens, N/bn = 224: group_m 16 took bf16 8748 -> 7689 us, w8a8
        # 4139 -> 3603; Qwen1.5, N/bn = 22: no gain, 781 vs 795 us)
        tile = dataclasses.replace(tile, group_m=16)
    steps = _steps(scheme, tile, k)
    if kind == "wonly":
        # weight-only codes stream through registers: the table's split is used as is (H200,
        # Qwen1.5 decode: split 2 with swap_ab 80 us; split 16 without 96 us), down to one K
        # step per split
        return dataclasses.replace(tile, split_k=max(1, min(tile.split_k, steps)))
    # others: keep >= 2 K steps per split, and stop splitting at ~16 programs per SM
    split = max(1, min(tile.split_k, steps // 2))
    sms = NUM_SMS_BY_KIND.get(device, 132)
    active = min(e, max(m, 1))
    programs = active * max(1, -(-int(mpe) // tile.bm)) * -(-n // tile.bn)
    while split > 1 and programs * (split // 2) >= 16 * sms:
        split //= 2
    return dataclasses.replace(tile, split_k=split)


GROUP_M_MIN_BLOCKS = 64  # column blocks beyond which tiles are grouped (TileConfig.group_m)

# weight-only schemes dequantize first (one pass, then the bf16 kernel) from this many routed
# rows per expert on; measured on the H200 (bench/NOTES.md), a heuristic elsewhere
DEQUANT_FIRST_ROWS = {"nvidia_h200": 128}


def dequant_first(scheme: QScheme, *, m: int, e: int, device: str | None = None) -> bool:
    """Whether ``gmm`` should dequantize weight-only codes before a bf16 GEMM."""
    scheme = QScheme.parse(scheme)
    if not scheme.weight_only or scheme.w_bits == 16:
        return False
    device = device or device_name()
    return m / max(e, 1) >= DEQUANT_FIRST_ROWS.get(device, 128)
