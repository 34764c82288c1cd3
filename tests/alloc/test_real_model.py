"""On a real trace + loss (the tiny trained model's): the solver's L <= every uniform scheme's L.

The files come from ``mxmoe-jax trace`` and ``mxmoe-jax calibrate``: by default they are made
here from ``../shared/models/qwen2moe-tiny-books`` on a few windows of books-calib (skipped where
``../shared`` is absent); the environment variables ``MXMOE_TRACE`` and ``MXMOE_LOSS`` point the
test at other files instead (``MXMOE_PERF`` optionally at a perf.json, else an analytic H200 table
for the trace's shapes is used).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import BOOKS_CALIB, require_shared

pytest.importorskip("pulp", reason="the solver needs PuLP, which is not installed here")

from mxmoe_jax.alloc.check_uniform import check_against_uniform, perf_for_trace
from mxmoe_jax.alloc.problem import build_inputs
from mxmoe_jax.perf.model import PerfModel

# weight-only and weight-activation schemes that fit every block of the tiny model (K = 192
# rules out g128 for its routed down_proj)
TINY_SCHEMES = ("w2a16_g64_asym", "w3a16_g64_asym", "w4a16_g-1_asym", "w8a16_g-1_asym",
                "w4a4_g-1_sym", "w8a8_g-1_sym")


@pytest.fixture(scope="module")
def real_files(tiny_model_dir, tmp_path_factory):
    trace, loss = os.environ.get("MXMOE_TRACE"), os.environ.get("MXMOE_LOSS")
    if trace and loss:
        for p in (trace, loss):
            if not Path(p).is_file():
                raise FileNotFoundError(f"{p} (from MXMOE_TRACE / MXMOE_LOSS) does not exist")
    else:
        from mxmoe_jax.cli import main as cli_main

        require_shared(BOOKS_CALIB)
        out = tmp_path_factory.mktemp("tiny-real")
        trace, loss = str(out / "trace.json"), str(out / "loss.json")
        data = ["--text", str(BOOKS_CALIB), "--seqlen", "256", "--nsamples", "4"]
        assert cli_main(["trace", "--model", str(tiny_model_dir), *data, "--out", trace]) == 0
        assert cli_main(["calibrate", "--model", str(tiny_model_dir), *data, "--schemes",
                         *TINY_SCHEMES, "--out", loss]) == 0
    return json.loads(Path(trace).read_text()), json.loads(Path(loss).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["layer", "model"])
def test_solver_beats_every_uniform_scheme_at_its_own_bits(real_files, mode):
    trace, loss = real_files
    perf_path = os.environ.get("MXMOE_PERF")
    perf = PerfModel.load(perf_path) if perf_path else perf_for_trace(trace, list(loss["losses"]))
    rows = check_against_uniform(build_inputs(trace, loss, perf, batch=512), mode=mode)
    assert rows, "no uniform scheme fits every block"
    for row in rows:
        assert row["solver_L"] <= row["uniform_L"] * (1 + 1e-9) + 1e-12, row
        assert row["solver_wbits"] <= row["wbits"] + 1e-8, row
