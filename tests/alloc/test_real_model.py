"""On a real trace + loss (the tiny trained model's): the solver's L <= every uniform scheme's L.

The files come from ``mxmoe-jax trace`` and ``mxmoe-jax calibrate``; point the environment
variables ``MXMOE_TRACE`` and ``MXMOE_LOSS`` at them (``MXMOE_PERF`` optionally at a perf.json,
else an analytic H200 table for the trace's shapes is used). Skipped when they are not set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mxmoe_jax.alloc.check_uniform import check_against_uniform, perf_for_trace
from mxmoe_jax.alloc.problem import build_inputs
from mxmoe_jax.perf.model import PerfModel


def _files():
    trace, loss = os.environ.get("MXMOE_TRACE"), os.environ.get("MXMOE_LOSS")
    if not (trace and loss):
        pytest.skip("set MXMOE_TRACE and MXMOE_LOSS to a real trace.json and loss.json")
    for p in (trace, loss):
        if not Path(p).is_file():
            pytest.skip(f"{p} does not exist")
    return json.loads(Path(trace).read_text()), json.loads(Path(loss).read_text())


@pytest.mark.parametrize("mode", ["layer", "model"])
def test_solver_beats_every_uniform_scheme_at_its_own_bits(mode):
    trace, loss = _files()
    perf_path = os.environ.get("MXMOE_PERF")
    perf = PerfModel.load(perf_path) if perf_path else perf_for_trace(trace, list(loss["losses"]))
    rows = check_against_uniform(build_inputs(trace, loss, perf, batch=512), mode=mode)
    assert rows, "no uniform scheme fits every block"
    for row in rows:
        assert row["solver_L"] <= row["uniform_L"] * (1 + 1e-9) + 1e-12, row
        assert row["solver_wbits"] <= row["wbits"] + 1e-8, row
