"""`solve`'s inputs when a candidate's group size does not divide a block's K (the tiny model's
routed down_proj, K = 192, under g128): offered with its `QScheme.for_k` substitute's bits and
time."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from mxmoe_jax.alloc.check_uniform import perf_for_trace
from mxmoe_jax.alloc.problem import build_inputs, group_arrays
from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace
from mxmoe_jax.quant.scheme import QScheme

SCHEMES = ["w4a16_g128_asym", "w8a16_g-1_asym"]
HIDDEN, INTER = 256, 192  # gate/up K = 256 (g128 fits), down K = 192 (g128 does not: g96)


@pytest.fixture(scope="module")
def files():
    trace = synthetic_trace(num_layers=1, num_experts=4, top_k=2, moe_inter=INTER, hidden=HIDDEN,
                            shared_ratio=4.0, num_tokens=256, seed=1)
    loss = synthetic_loss(trace, SCHEMES, seed=1)
    loss["meta"]["group_size_substitutions"] = [
        {"scheme": "w4a16_g128_asym", "k": 192, "blocks": ["down_proj"], "used": "w4a16_g96_asym"}]
    return trace, loss


def test_substituted_scheme_is_offered_with_its_own_bits_and_time(files):
    trace, loss = files
    perf = perf_for_trace(trace, [*SCHEMES, "w4a16_g96_asym"])
    ld = build_inputs(trace, loss, perf, batch=128).layers[0]
    j = SCHEMES.index("w4a16_g128_asym")
    routed, shared = slice(0, 4), 4  # the shared expert's down has K = 768: g128 fits
    np.testing.assert_allclose(ld.bpw[routed, 1, j], QScheme.parse("w4a16_g96_asym")
                               .bits_per_weight(INTER))
    np.testing.assert_allclose(ld.bpw[routed, 0, j], 4.25)
    assert ld.bpw[shared, 1, j] == 4.25
    k, n = INTER, HIDDEN
    m = ld.tokens[0]
    assert ld.time[0, 1, j] == pytest.approx(
        perf.cost_us("w4a16_g96_asym", m, n, k) - perf.launch_us)
    a = group_arrays(ld)
    assert np.isfinite(a["loss"][:, :, j]).all() and np.isfinite(a["time"][:, :, j]).all()


def test_missing_perf_of_the_substitute_is_named(files):
    trace, loss = files
    with pytest.raises(ValueError, match=r"w4a16_g96_asym n=256 k=192 \(what w4a16_g128_asym"):
        build_inputs(trace, loss, perf_for_trace(trace, SCHEMES), batch=128)


def test_loss_measured_with_another_substitute_is_refused(files):
    trace, loss = files
    stale = copy.deepcopy(loss)
    stale["meta"]["group_size_substitutions"][0]["used"] = "w4a16_g64_asym"
    with pytest.raises(ValueError, match="measured w4a16_g128_asym as w4a16_g64_asym at K=192"):
        build_inputs(trace, stale, perf_for_trace(trace, [*SCHEMES, "w4a16_g96_asym"]),
                     batch=128)


def test_null_loss_from_an_older_calibration_is_still_not_offered(files):
    trace, loss = files
    old = copy.deepcopy(loss)
    del old["meta"]["group_size_substitutions"]
    for row in old["losses"]["w4a16_g128_asym"]["0"].values():
        row[2] = None
    ld = build_inputs(trace, old, perf_for_trace(trace, [*SCHEMES, "w4a16_g96_asym"]),
                      batch=128).layers[0]
    j = SCHEMES.index("w4a16_g128_asym")
    assert np.isnan(group_arrays(ld)["loss"][:, 1, j]).all()
