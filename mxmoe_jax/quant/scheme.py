"""`QScheme`: the one object that knows a quantization scheme's name, grid and storage cost.

Names follow the original MxMoE (arXiv 2505.05799): ``w{W}a{A}_g{G}_{sym|asym}``.

* ``W`` weight bits (2, 3, 4, 8, or 16 = unquantized bf16), ``A`` activation bits (4, 8 or 16).
* ``G`` is the ``group_size``: input channels (along K) that share one scale; ``-1`` means one scale
  per output channel for weights and one per token for activations.
* ``sym`` weights are ``q * scale`` with ``q`` on the symmetric grid ``[-(2^(W-1)-1), 2^(W-1)-1]``
  (e.g. -7..7 for 4 bits, -127..127 for 8: the int8 tensor core path needs no zero point);
  ``asym`` weights are ``q * scale + offset`` with ``q`` in ``[0, 2^W - 1]`` and a float offset
  (the original's RTN ``min``; GPTQ's integer zero ``z`` is the offset ``-z * scale``).
* ``w8a8_g-1_fp8``: weights and activations in FP8 E4M3 with per-channel / per-token f32 scales.
* ``w16a16``: bf16 weights and activations (the unquantized baseline).

Activations, when quantized (A < 16), are always symmetric, dynamic, per token (``G = -1``) or per
token and ``G``-wide group along K, with the same ``G`` as the weights (as in the original).

A scheme names the group size asked for; `QScheme.for_k` gives the scheme a block of K input
features is actually quantized with (another group size where ``G`` does not divide K, e.g.
w4a16_g128_asym on K = 192 is w4a16_g96_asym), and `for_block` does the same and says so on stderr.
"""

from __future__ import annotations

import dataclasses
import re
import sys

_NAME = re.compile(r"^w(\d+)a(\d+)(?:_g(-1|\d+))?(?:_(sym|asym|fp8))?$")

# Storage of one scale / offset in bits: schemes store them as 16-bit floats.
SCALE_BITS = 16

_ALLOWED_W_BITS_A16 = (2, 3, 4, 8, 16)
_ALLOWED_WA = {(4, 4), (4, 8), (8, 8)}

# Group sizes are multiples of this (`QScheme` refuses others), substitutes (`for_k`) included.
GROUP_MULTIPLE = 16
# The fused grouped-GEMM kernels run K-groups only in whole 128-row packing chunks (or per channel):
# ``kernels.pallas.grouped_gemm.supports``, ``quant.packing.CHUNK``; other groups take the slower
# reference path. Repeated here because quant/ does not import the kernels (a test keeps it equal).
KERNEL_GROUP_MULTIPLE = 128


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QScheme:
    """A quantization scheme for one linear block (weights and its input activations)."""

    w_bits: int  # weight bits: 2, 3, 4, 8 or 16 (16 = bf16, unquantized)
    a_bits: int  # activation bits: 16 (weight-only), 8 or 4
    group_size: int = -1  # input channels per scale; -1 = per output channel / per token
    sym: bool = True  # symmetric integer grid (no offset); asym stores a float offset per scale
    fp8: bool = False  # FP8 E4M3 weights and activations (only w8a8, per channel / per token)

    def __post_init__(self):
        if self.w_bits == 16:
            if self.a_bits != 16 or self.group_size != -1 or self.fp8 or not self.sym:
                raise ValueError("w_bits: w16 is plain bf16; it takes no a_bits<16, group or asym")
            return
        if self.a_bits == 16:
            if self.w_bits not in _ALLOWED_W_BITS_A16:
                raise ValueError(f"w_bits: {self.w_bits} is not one of {_ALLOWED_W_BITS_A16}")
        else:
            if (self.w_bits, self.a_bits) not in _ALLOWED_WA:
                raise ValueError(
                    f"a_bits: w{self.w_bits}a{self.a_bits} is not supported; weight-activation "
                    f"schemes are {sorted(_ALLOWED_WA)}")
            if not self.sym:
                raise ValueError("sym: weight-activation schemes (a_bits < 16) must be symmetric")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 16):
            raise ValueError(f"group_size: {self.group_size} must be -1 (per channel) or a "
                             "positive multiple of 16")
        if self.fp8 and not (self.w_bits == 8 and self.a_bits == 8 and self.group_size == -1):
            raise ValueError("fp8: only w8a8_g-1_fp8 (per-channel / per-token scales) exists")

    # -- names ------------------------------------------------------------------------------
    @classmethod
    def parse(cls, name: str | QScheme) -> QScheme:
        """Parse ``w4a16_g128_asym``, ``w8a8_g-1_sym``, ``w8a8_g-1_fp8``, ``w16a16``."""
        if isinstance(name, QScheme):
            return name
        m = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
        if m is None:
            raise ValueError(
                f"scheme {name!r}: expected w{{W}}a{{A}}_g{{G}}_{{sym|asym|fp8}}, "
                "e.g. w4a16_g128_asym, w8a8_g-1_sym, w8a8_g-1_fp8 or w16a16")
        w, a, g, kind = int(m[1]), int(m[2]), m[3], m[4]
        if w == 16:
            if (g not in (None, "-1")) or kind not in (None, "sym"):
                raise ValueError(f"scheme {name!r}: w16a16 takes no group or asym suffix")
            return cls(w_bits=16, a_bits=16)
        if g is None or kind is None:
            raise ValueError(f"scheme {name!r}: quantized schemes need _g{{G}}_{{sym|asym|fp8}}")
        try:
            return cls(w_bits=w, a_bits=a, group_size=int(g), sym=kind != "asym",
                       fp8=kind == "fp8")
        except ValueError as err:
            raise ValueError(f"scheme {name!r}: {err}") from None

    @property
    def name(self) -> str:
        if self.w_bits == 16:
            return "w16a16"
        kind = "fp8" if self.fp8 else ("sym" if self.sym else "asym")
        return f"w{self.w_bits}a{self.a_bits}_g{self.group_size}_{kind}"

    def __str__(self) -> str:
        return self.name

    # -- properties -------------------------------------------------------------------------
    @property
    def is_float(self) -> bool:
        """bf16 or FP8: no integer grid."""
        return self.w_bits == 16 or self.fp8

    @property
    def weight_only(self) -> bool:
        return self.a_bits == 16

    @property
    def qmin(self) -> int:
        """Smallest integer weight code (the canonical grid; every quantizer and kernel uses it)."""
        self._require_int()
        return -(2 ** (self.w_bits - 1) - 1) if self.sym else 0

    @property
    def qmax(self) -> int:
        self._require_int()
        return 2 ** (self.w_bits - 1) - 1 if self.sym else 2**self.w_bits - 1

    @property
    def a_qmax(self) -> int:
        """Activation grid is symmetric: [-a_qmax, a_qmax]."""
        if self.a_bits == 16 or self.fp8:
            raise ValueError(f"{self.name}: activations are not integer-quantized")
        return 2 ** (self.a_bits - 1) - 1

    def _require_int(self):
        if self.is_float:
            raise ValueError(f"{self.name}: a float scheme has no integer grid")

    def scale_groups(self, k: int) -> int:
        """Scales per output channel for a K-wide input; raises if group_size does not divide K."""
        if self.w_bits == 16:
            return 0
        if self.group_size == -1:
            return 1
        if k % self.group_size:
            raise ValueError(
                f"group_size: {self.group_size} does not divide K={k}; use a divisor of K or -1")
        return k // self.group_size

    def for_k(self, k: int) -> QScheme:
        """The scheme a block with ``k`` input features is quantized with when this one is asked.

        Itself when its group size divides ``k`` (or it has no K-groups: per channel, w16a16).
        Otherwise the largest group size ``G'`` below the requested ``G`` that divides ``k`` and is
        a multiple of 16, taken among the multiples of 128 first (the sizes the fused kernels run);
        per channel (``-1``) when that ``G'`` would be ``k`` itself (one group per channel *is* per
        channel, numerically and in storage, and the kernels run it) or when no such ``G'``
        exists. So w4a16_g128_asym is w4a16_g96_asym on K = 192, w4a16_g-1_asym on K = 64 or 200;
        w4a16_g256_asym is w4a16_g128_asym on K = 384. Everything downstream (calibrate's Δ,
        solve's bits and times, `Allocation`) applies this one rule, so a scheme named in
        loss.json or qconfig.json means ``scheme.for_k(K)`` in each block.
        """
        if k <= 0:
            raise ValueError(f"k: {k} input features; expected a positive number")
        g = self.group_size
        if self.w_bits == 16 or g == -1 or k % g == 0:
            return self
        fits = [c for c in range(GROUP_MULTIPLE, min(g, k) + 1, GROUP_MULTIPLE) if k % c == 0]
        fused = [c for c in fits if c % KERNEL_GROUP_MULTIPLE == 0]
        best = max(fused or fits, default=k)
        return dataclasses.replace(self, group_size=-1 if best == k else best)

    def bits_per_weight(self, k: int | None = None) -> float:
        """Average storage bits per weight element, scales and offsets included.

        Each scale and each asym offset is a 16-bit float. For ``group_size = G`` that adds
        ``16/G`` (sym) or ``32/G`` (asym): w4a16_g128_asym = 4.25, w4a4_g128_sym = 4.125.
        Per-channel scales add ``16/K`` or ``32/K``; without ``k`` they are not counted (the
        original's convention: w4a16_g-1 = 4). FP8 and int8 per-channel scales are counted the
        same way. ``w16a16`` is 16.
        """
        if self.w_bits == 16:
            return 16.0
        per_scale = SCALE_BITS * (1 if self.sym else 2)
        if self.group_size != -1:
            return self.w_bits + per_scale / self.group_size
        return self.w_bits + (per_scale / k if k else 0.0)


W16A16 = QScheme(w_bits=16, a_bits=16)

_NOTED: set[tuple[str, int]] = set()


def for_block(scheme: QScheme | str, k: int, where: str) -> QScheme:
    """``QScheme.parse(scheme).for_k(k)``, saying on stderr when that changes the group size:
    ``w4a16_g128_asym: group size 128 does not divide down_proj K=192; using w4a16_g96_asym
    there``. ``where`` names the block(s) with this K. Each (scheme, K) is reported once per
    process: `mxmoe-jax run` runs calibrate, solve and quantize in one, and they all meet the same
    substitution."""
    scheme = QScheme.parse(scheme)
    used = scheme.for_k(k)
    if used != scheme and (scheme.name, k) not in _NOTED:
        _NOTED.add((scheme.name, k))
        print(substitution_note(scheme, k, where), file=sys.stderr, flush=True)
    return used


def substitution_note(scheme: QScheme, k: int, where: str) -> str:
    """The one-line note `for_block` prints (also for callers that report it themselves)."""
    return (f"{scheme.name}: group size {scheme.group_size} does not divide {where} K={k}; "
            f"using {scheme.for_k(k).name} there")


# The original MxMoE's calibrated set (its quant.py), minus w1 which has no kernel anywhere.
ORIGINAL_SCHEMES = (
    "w8a8_g-1_sym", "w4a4_g-1_sym", "w4a4_g128_sym", "w8a16_g-1_asym", "w4a16_g-1_asym",
    "w4a16_g128_asym", "w3a16_g128_asym", "w2a16_g128_asym",
)
