"""`PerfModel`: kernel cost lookups from a perf.json table (analytic or measured).

perf.json (``mxmoe-jax/perf/1``), written by ``mxmoe-jax profile``::

    {"format": "mxmoe-jax/perf/1", "source": "analytic" | "measured", "device": "H200",
     "jax_version": "...", "kernel_version": "...", "created": "<iso date>", "notes": "...",
     "points": [{"scheme": "w4a16_g128_asym",
                 "tile": {"bm":16, "bn":128, "bk":128, "split_k":4, "num_warps":4, "num_stages":3},
                 "m": 32, "n": 2816, "k": 2048, "time_us": 12.3}, ...],
     ... extra fields (analytic: "launch_us", "device_constants", "weight_stream_efficiency")}

``m`` is tokens per expert; a point is one GEMM ``[m, k] x [k, n]`` run alone (one launch).
``cost_us`` takes the fastest tile at each measured ``m`` and interpolates linearly in ``m`` between
points (linear extrapolation above the largest, the smallest point's time below it; ``m = 0``
costs 0). The optional top-level ``launch_us`` is the part of each point that is one kernel launch:
the solver pays it once per layer and GEMM kind (the mixed layer runs as one launch), not per
expert.
"""

from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

from mxmoe_jax.jsonio import PERF_FORMAT as FORMAT
from mxmoe_jax.quant.scheme import QScheme

_REQUIRED = ("format", "source", "device", "points")
_TILE_FIELDS = ("bm", "bn", "bk", "split_k", "num_warps", "num_stages")


class PerfModel:
    """Best-tile GEMM times per (scheme, n, k), interpolated over tokens per expert ``m``."""

    def __init__(self, table: dict, *, path: str | None = None):
        where = path or "perf table"
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
        self.launch_us: float = float(table.get("launch_us", 0.0))
        best: dict[tuple[str, int, int], dict[int, tuple[float, dict]]] = {}
        for i, p in enumerate(table["points"]):
            try:
                name = QScheme.parse(p["scheme"]).name
                m, n, k, t = int(p["m"]), int(p["n"]), int(p["k"]), float(p["time_us"])
                tile = {f: int(p["tile"][f]) for f in _TILE_FIELDS}
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{where}: points[{i}] is malformed ({err})") from None
            if m < 0 or not t >= 0:
                raise ValueError(f"{where}: points[{i}] has m < 0 or a bad time_us")
            slot = best.setdefault((name, n, k), {})
            if m not in slot or t < slot[m][0]:
                slot[m] = (t, tile)
        self._curves = {key: sorted((m, t, tile) for m, (t, tile) in d.items())
                        for key, d in best.items()}

    @classmethod
    def load(cls, path: str | Path) -> PerfModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: perf table not found (make one with "
                                    "`mxmoe-jax profile --analytic DEVICE --shapes MODEL`)")
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
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
        """Best-tile time (µs) of one [m, k] x [k, n] GEMM of ``scheme``, interpolated over m."""
        if m <= 0:
            return 0.0
        curve = self._curve(scheme, n, k)
        ms = [c[0] for c in curve]
        ts = [c[1] for c in curve]
        if len(ms) == 1 or m <= ms[0]:
            return ts[0]
        i = bisect.bisect_left(ms, m)
        if i >= len(ms):  # extrapolate with the last segment's slope
            i = len(ms) - 1
        m0, m1, t0, t1 = ms[i - 1], ms[i], ts[i - 1], ts[i]
        return max(0.0, t0 + (t1 - t0) * (m - m0) / (m1 - m0))

    def _curve(self, scheme, n, k):
        key = (QScheme.parse(scheme).name, int(n), int(k))
        curve = self._curves.get(key)
        if curve is None:
            raise ValueError(
                f"{self.path or 'perf table'}: no entry for scheme {key[0]} at n={key[1]}, "
                f"k={key[2]}; re-run `mxmoe-jax profile` with this scheme and model shape")
        if not all(math.isfinite(c[1]) for c in curve):
            raise ValueError(f"perf table: non-finite time for {key}")
        return curve
