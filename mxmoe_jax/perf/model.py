"""`PerfModel`: kernel cost lookups from a perf.json table (analytic or measured).

perf.json (``mxmoe-jax/perf/1``), written by ``mxmoe-jax profile``::

    {"format": "mxmoe-jax/perf/1", "source": "analytic" | "measured", "device": "H200",
     "jax_version": "...", "kernel_version": "...", "created": "<iso date>", "notes": "...",
     "points": [{"scheme": "w4a16_g128_asym",
                 "tile": {"bm":16, "bn":128, "bk":128, "split_k":4, "num_warps":4, "num_stages":3},
                 "m": 32, "n": 2816, "k": 2048, "time_us": 12.3}, ...],
     ... extra fields (analytic: "launch_us", "device_constants", "weight_stream_efficiency")}

``m`` is tokens per expert; a point is one launch of ``experts`` experts (default 1: the analytic
table's one GEMM ``[m, k] x [k, n]`` alone) with ``m`` rows each. ``cost_us`` takes the fastest
tile at each ``m`` and interpolates linearly in ``m`` between points (linear extrapolation above
the largest, the smallest point's time below it; ``m = 0`` costs 0). The optional top-level
``launch_us`` is the part of each point that is one kernel launch: the solver pays it once per
layer and GEMM kind (the mixed layer runs as one launch), not per expert. ``share_us`` is one
expert's share of a launch, ``(time_us - launch_us) / experts``, interpolated the same way: what
``perf.predict`` and the solver add up per expert.

Provenance: ``check_provenance`` compares a measured table's device and ``kernel_version`` with
this machine's GPU and kernels (``perf.profile``) and warns, or raises with ``strict``.
"""

from __future__ import annotations

import bisect
import math
import warnings
from pathlib import Path

from mxmoe_jax.jsonio import PERF_FORMAT as FORMAT
from mxmoe_jax.jsonio import read_json
from mxmoe_jax.quant.scheme import QScheme

_REQUIRED = ("format", "source", "device", "points")
_TILE_FIELDS = ("bm", "bn", "bk", "split_k", "num_warps", "num_stages")


class PerfModel:
    """Best-tile GEMM times per (scheme, n, k), interpolated over tokens per expert ``m``."""

    def __init__(self, table: dict, *, path: str | None = None):
        where = path or "perf table"
        if not isinstance(table, dict):
            raise ValueError(f"{where}: a perf table is a JSON object, not a "
                             f"{type(table).__name__}")
        missing = [f for f in _REQUIRED if f not in table]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if table["format"] != FORMAT:
            raise ValueError(f"{where}: format {table['format']!r}, expected {FORMAT!r}")
        if table["source"] not in ("analytic", "measured"):
            raise ValueError(f"{where}: source must be 'analytic' or 'measured', "
                             f"got {table['source']!r}")
        self.table = table
        self.path = path
        self.source: str = table["source"]
        self.device: str = table["device"]
        try:
            self.launch_us: float = float(table.get("launch_us", 0.0))
        except (TypeError, ValueError):
            raise ValueError(f"{where}: launch_us must be a number, got "
                             f"{table['launch_us']!r}") from None
        if not math.isfinite(self.launch_us) or self.launch_us < 0:
            raise ValueError(f"{where}: launch_us must be a finite number >= 0")
        if not isinstance(table["points"], list):
            raise ValueError(f"{where}: points must be a list")
        best: dict[tuple[str, int, int], dict[int, tuple[float, dict]]] = {}
        shares: dict[tuple[str, int, int], dict[int, float]] = {}
        for i, p in enumerate(table["points"]):
            try:
                name = QScheme.parse(p["scheme"]).name
                m, n, k, t = int(p["m"]), int(p["n"]), int(p["k"]), float(p["time_us"])
                experts = int(p.get("experts", 1))
                tile = {f: int(p["tile"][f]) for f in _TILE_FIELDS}
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
                raise ValueError(f"{where}: points[{i}] is malformed ({err})") from None
            if m < 0 or not 0 <= t < math.inf or experts < 1:
                raise ValueError(f"{where}: points[{i}] has m < 0, experts < 1 or a bad time_us")
            slot = best.setdefault((name, n, k), {})
            if m not in slot or t < slot[m][0]:
                slot[m] = (t, tile)
            share = max(0.0, t - self.launch_us) / experts
            sl = shares.setdefault((name, n, k), {})
            sl[m] = min(share, sl.get(m, math.inf))
        self._curves = {key: sorted((m, t, tile) for m, (t, tile) in d.items())
                        for key, d in best.items()}
        self._shares = {key: sorted(d.items()) for key, d in shares.items()}

    @classmethod
    def load(cls, path: str | Path) -> PerfModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: perf table not found (make one with "
                                    "`mxmoe-jax profile --analytic DEVICE --shapes MODEL`)")
        table = read_json(path, "perf table")
        return cls(table, path=str(path))

    @property
    def label(self) -> str:
        """How the numbers were made, for every downstream table and plot."""
        return f"{self.source} perf table, {self.device}"

    def entries(self) -> set[tuple[str, int, int]]:
        """(scheme name, n, k) triples the table covers."""
        return set(self._curves)

    def has(self, scheme: QScheme | str, n: int, k: int) -> bool:
        return (QScheme.parse(scheme).name, int(n), int(k)) in self._curves

    def best_tile(self, scheme: QScheme | str, m: float, n: int, k: int) -> dict:
        """The fastest tile at the table's nearest m at or above ``m`` (the largest m beyond it)."""
        curve = self._curve(scheme, n, k)
        ms = [c[0] for c in curve]
        i = min(bisect.bisect_left(ms, m), len(ms) - 1)
        return dict(curve[i][2])

    def cost_us(self, scheme: QScheme | str, m: float, n: int, k: int) -> float:
        """Best-tile time (µs) of one launch at ``m`` tokens per expert (of one [m, k] x [k, n]
        GEMM for the analytic table), interpolated over m."""
        if m <= 0:
            return 0.0
        curve = self._curve(scheme, n, k)
        return _interp([c[0] for c in curve], [c[1] for c in curve], m)

    def share_us(self, scheme: QScheme | str, m: float, n: int, k: int) -> float:
        """One expert's share (µs) of a shared launch at ``m`` tokens: ``(time - launch) /
        experts`` of the table's points, interpolated over m; 0 at ``m = 0``."""
        if m <= 0:
            return 0.0
        self._curve(scheme, n, k)  # the missing-entry error
        pts = self._shares[(QScheme.parse(scheme).name, int(n), int(k))]
        return _interp([p[0] for p in pts], [p[1] for p in pts], m)

    def check_provenance(self, *, device: str | None, kernel_version: str | None,
                         strict: bool = False, warn: bool = True) -> list[str]:
        """Problems using this table here: a measured table from another GPU than ``device``
        (None: no GPU here, nothing to compare) or from kernels other than ``kernel_version``.
        Each is warned (``UserWarning``; not with ``warn=False``: the CLI prints them), or raised
        as ``ValueError`` with ``strict``; returns them. An analytic table is a fallback by
        construction and is not checked."""
        if self.source != "measured":
            return []
        where = self.path or "perf table"
        problems = []
        if device is not None and self.device != device:
            problems.append(f"{where} was measured on {self.device!r}, this GPU is {device!r}: "
                            "its times are not this GPU's (run `mxmoe-jax profile` here)")
        have = self.table.get("kernel_version")
        if kernel_version is not None and have != kernel_version:
            problems.append(f"{where} was measured with kernels {have!r}, these are "
                            f"{kernel_version!r}: re-run `mxmoe-jax profile` for current times")
        if problems and strict:
            raise ValueError("; ".join(problems) + " (--strict)")
        for msg in problems if warn else ():
            warnings.warn(msg, stacklevel=2)
        return problems

    def _curve(self, scheme, n, k):
        """The (m, best time, tile) points of one entry, or an error naming what is missing."""
        key = (QScheme.parse(scheme).name, int(n), int(k))
        curve = self._curves.get(key)
        if curve is None:
            raise ValueError(
                f"{self.path or 'perf table'}: no entry for scheme {key[0]} at n={key[1]}, "
                f"k={key[2]}; re-run `mxmoe-jax profile` with this scheme and model shape")
        if not all(math.isfinite(c[1]) for c in curve):
            raise ValueError(f"perf table: non-finite time for {key}")
        return curve


def _interp(ms: list, ts: list, m: float) -> float:
    """Piecewise-linear in ``m`` through (ms, ts): the first value below ``ms[0]``, the last
    segment's slope above ``ms[-1]``, never negative."""
    if len(ms) == 1 or m <= ms[0]:
        return ts[0]
    i = min(bisect.bisect_left(ms, m), len(ms) - 1)
    m0, m1, t0, t1 = ms[i - 1], ms[i], ts[i - 1], ts[i]
    return max(0.0, t0 + (t1 - t0) * (m - m0) / (m1 - m0))
