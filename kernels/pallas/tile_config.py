"""``TileConfig``: the static tile shape and launch parameters of one grouped-GEMM variant."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TileConfig:
    """Static tile shape and launch parameters of one grouped-GEMM kernel variant."""

    bm: int = 64  # rows (tokens) per tile; power of two >= 16
    bn: int = 128  # output columns per program; power of two >= 16
    bk: int = 64  # K per step (sub-byte and g128 schemes use the 128-row chunk instead)
    split_k: int = 1  # K ranges computed by separate programs (>= 1)
    num_warps: int = 4  # warps per program (power of two)
    num_stages: int = 3  # software-pipelining depth of the K loop
    # compute out^T = W^T x^T: the weight tile is the MMA's left operand (on Hopper a wgmma
    # operand that may come from registers, so unpacked codes skip the shared-memory round trip)
    swap_ab: bool = False
    # program order: tiles are taken ``group_m`` at a time, and within a group the tile index runs
    # fastest, so each weight column block is read once per group (1: column blocks fastest)
    group_m: int = 1

    def __post_init__(self):
        for name in ("bm", "bn", "bk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}: {v} must be a power of two >= 16")
        if self.split_k < 1:
            raise ValueError(f"split_k: {self.split_k} must be >= 1")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps: {self.num_warps} must be a power of two")
        if self.group_m < 1:
            raise ValueError(f"group_m: {self.group_m} must be >= 1")
        if self.num_stages < 1:
            raise ValueError(f"num_stages: {self.num_stages} must be >= 1")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
