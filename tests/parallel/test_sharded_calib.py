"""Calibration's per-chunk Δ² and MoE output with the routed experts sharded over 2 and 8
simulated CPU devices (``calib_check.py`` in a subprocess) equal the single-device
``calibrate._chunk_losses`` (which ``tests/calib`` holds to a brute-force layer rerun)."""

from __future__ import annotations

import pytest

from tests.parallel import calib_check, ep_check, run_on_8_devices

DEVICES = (2, 8)


@pytest.fixture(scope="module")
def rows():
    return run_on_8_devices("tests.parallel.calib_check", *map(str, DEVICES))


def test_every_case_ran(rows):
    got = {(r["case"], r["devices"]) for r in rows}
    assert got == {(c, n) for c in ("random", "empty_expert", "all_to_one") for n in DEVICES}


def test_sharded_losses_equal_single_device(rows):
    for r in rows:
        # 3 parts (w4a16; w8a8_g16 on gate/up and its g-1 substitute on the 12-wide down),
        # 8 routed experts + the shared one, 3 blocks
        assert r["shape"] == r["ref_shape"] == [3, ep_check.E + 1, 3], r
        assert r["sq_scale"] > 1.0 and r["out_scale"] > 1.0, r  # not vacuous
        assert r["sq_zero_match"], r  # the same (expert, block) are zero: unused / other part
        # f32 sums in another order (token slices of the shared expert, experts over devices)
        assert r["sq_err"] <= 1e-6 * r["sq_scale"], r
        assert r["out_err"] <= 1e-6 * r["out_scale"], r


def test_routing_cases_are_uneven(rows):
    for r in rows:
        if r["case"] == "empty_expert":
            assert r["loads"][5] == 0, r
        if r["case"] == "all_to_one":  # the real tokens all on expert 6 (padding: on expert 0)
            assert r["loads"][6] == ep_check.T - calib_check.PAD, r
