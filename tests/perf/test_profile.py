"""The measured profile (`perf.profile`), its provenance checks and the layer predictor."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from mxmoe_jax.cli import main as cli
from mxmoe_jax.perf import profile as P
from mxmoe_jax.perf.model import PerfModel
from mxmoe_jax.perf.predict import layer_us, zipf_group_sizes
from mxmoe_jax.perf.shapes import MoEShapes
from mxmoe_jax.perf.timing import no_captured_constants
from tests.conftest import ON_GPU

SMALL = MoEShapes(name="small", hidden=128, moe_inter=64, num_experts=4, top_k=2)


def _fake_timer(calls):
    """Runs the call (so the procedure really executes the kernels, in interpret mode) and
    returns a time that depends on its rows and weight bytes: not a kernel time."""

    def timer(fn, *args):
        with no_captured_constants("profile's timed call", limit=4096):  # weights are arguments
            out = np.asarray(fn(*args))
        assert np.isfinite(out).all()
        calls.append(args[0].shape[0])
        return 3.0 + 0.25 * args[0].shape[0]
    return timer


def test_measure_table_runs_every_point_and_loads(tmp_path):
    calls = []
    tab = P.measure_table([SMALL], ["w16a16", "w4a16_g128_asym"], tokens=(1, 4),
                          timer=_fake_timer(calls), interpret=True, progress=False)
    assert tab["source"] == "measured" and tab["kernel_version"] == P.kernel_version()
    assert "interpret" in tab["device"] and "NOT kernel times" in tab["notes"]
    # 2 schemes x 2 GEMMs (gate_up 128x128, down 128x64) x 2 token counts, plus the launch
    assert len(tab["points"]) == 8 and len(calls) == 9
    assert tab["launch_us"] == 3.0 + 0.25 * 16
    by = {(p["scheme"], p["n"], p["k"], p["m"]): p for p in tab["points"]}
    # g128 is wider than down's K = 64: measured as what the model uses there (per channel)
    assert ("w4a16_g-1_asym", 128, 64, 4) in by and ("w4a16_g128_asym", 128, 128, 1) in by
    p = by[("w16a16", 128, 128, 4)]  # gate_up
    assert p["experts"] == 4 and p["epilogue"] == "swiglu" and p["time_us"] == 3.0 + 0.25 * 16
    assert by[("w16a16", 128, 64, 1)]["epilogue"] == "none"  # down
    path = tmp_path / "perf.json"
    path.write_text(json.dumps(tab))
    pm = PerfModel.load(path)  # round trip
    assert pm.source == "measured" and pm.launch_us == tab["launch_us"]
    # one expert's share of the launch: (time - launch) / experts
    assert pm.share_us("w16a16", 4, 128, 128) == pytest.approx((3.0 + 0.25 * 16 - 7.0) / 4)
    assert pm.share_us("w16a16", 1, 128, 128) == pytest.approx(0.0)


@pytest.mark.skipif(not ON_GPU, reason="measures device time: needs an NVIDIA GPU")
def test_measure_table_on_the_gpu_gives_device_times(tmp_path):
    tab = P.measure_table([SMALL], ["w16a16", "w4a16_g128_asym"], tokens=(1, 64), reps=3,
                          progress=False)
    assert tab["device"] == P.current_device() and "interpret" not in tab["notes"]
    assert tab["launch_us"] > 0 and len(tab["points"]) == 8
    assert all(np.isfinite(p["time_us"]) and p["time_us"] > 0 for p in tab["points"])
    (tmp_path / "perf.json").write_text(json.dumps(tab))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # this device, these kernels: no provenance warning
        pm = PerfModel.load(tmp_path / "perf.json")
        pm.check_provenance(device=P.current_device(), kernel_version=P.kernel_version(),
                            strict=True)
    assert pm.source == "measured"


def test_measure_rows_are_capped(monkeypatch):
    monkeypatch.setattr(P, "MAX_ROWS", 8)
    plan, _ = P._plan([SMALL], ["w16a16"], (1, 4))
    assert [(m, e) for *_, m, e in plan[:2]] == [(1, 4), (4, 2)]


@pytest.mark.skipif(ON_GPU, reason="on a GPU, profile measures: this checks the refusal elsewhere")
def test_profile_needs_a_gpu_to_measure(tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert cli(["profile", "--shapes", "qwen1.5-moe", "--out", str(out)]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err and not out.exists()
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        P.measure_table([SMALL], ["w16a16"], tokens=(1,), progress=False)


def test_kernel_version_follows_the_kernel_sources(tmp_path, monkeypatch):
    copy = tmp_path / "pallas"
    shutil.copytree(P.KERNEL_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(P, "KERNEL_DIR", copy)
    before = P.kernel_version()
    assert before == P.kernel_version() and before.startswith("pallas-")
    (copy / "tuning.py").write_text((copy / "tuning.py").read_text() + "\n# edited\n")
    assert P.kernel_version() != before


def _measured(device="NVIDIA H200", kernels="pallas-abc", **extra):
    pt = {"scheme": "w16a16", "m": 8, "n": 64, "k": 32, "time_us": 10.0, "experts": 2,
          "tile": {"bm": 16, "bn": 64, "bk": 32, "split_k": 1, "num_warps": 4, "num_stages": 3}}
    return {"format": "mxmoe-jax/perf/1", "source": "measured", "device": device,
            "kernel_version": kernels, "launch_us": 4.0, "points": [pt], **extra}


def test_provenance_warns_or_refuses():
    pm = PerfModel(_measured())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pm.check_provenance(device=None, kernel_version="pallas-abc") == []
        assert pm.check_provenance(device="NVIDIA H200", kernel_version="pallas-abc") == []
    with pytest.warns(UserWarning, match="measured on 'NVIDIA H200', this GPU is 'NVIDIA A100"):
        assert len(pm.check_provenance(device="NVIDIA A100-SXM4-80GB",
                                       kernel_version="pallas-abc")) == 1
    with pytest.warns(UserWarning, match="kernels 'pallas-abc', these are 'pallas-new'"):
        pm.check_provenance(device=None, kernel_version="pallas-new")
    with pytest.raises(ValueError, match="--strict"):
        pm.check_provenance(device=None, kernel_version="pallas-new", strict=True)
    analytic = PerfModel(dict(_measured(), source="analytic"))
    assert analytic.check_provenance(device="other", kernel_version="x", strict=True) == []


def test_bad_measured_points_are_refused():
    with pytest.raises(ValueError, match=r"points\[0\] has m < 0, experts < 1"):
        PerfModel(_measured(points=[dict(_measured()["points"][0], experts=0)]))
    with pytest.raises(ValueError, match="points must be a list"):
        PerfModel(_measured(points={"a": 1}))


def _linear_table(shape: MoEShapes, schemes, launch=5.0, experts=4):
    """Points whose share is known by construction: share(s, m) = c_s * m per GEMM."""
    pts = []
    for si, s in enumerate(schemes):
        for n, k in shape.gemms():
            for m in (1, 16, 256):
                share = (si + 1) * 0.5 * m * (n * k) / 1e4
                pts.append({"scheme": s, "m": m, "n": n, "k": k, "experts": experts,
                            "time_us": launch + experts * share,
                            "tile": {"bm": 16, "bn": 64, "bk": 64, "split_k": 1, "num_warps": 4,
                                     "num_stages": 3}})
    return PerfModel({"format": "mxmoe-jax/perf/1", "source": "measured", "device": "X",
                      "launch_us": launch, "points": pts})


def test_layer_us_adds_shares_of_one_launch_per_gemm():
    shape = MoEShapes(name="s", hidden=128, moe_inter=64, num_experts=3, top_k=2,
                      shared_inter=128)
    pm = _linear_table(shape, ["w16a16", "w4a16_g-1_asym"])
    gs = np.array([16, 0, 4])
    gu, dn = ["w16a16", "w4a16_g-1_asym", "w4a16_g-1_asym"], ["w16a16", "w16a16",
                                                               "w4a16_g-1_asym"]
    c = {"w16a16": 0.5, "w4a16_g-1_asym": 1.0}
    gate_up, down = 128 * 128 / 1e4, 64 * 128 / 1e4  # n * k / 1e4 of each GEMM
    want = 2 * 5.0 + sum(c[gu[e]] * gs[e] * gate_up + c[dn[e]] * gs[e] * down for e in range(3))
    assert layer_us(pm, shape, gu, dn, gs) == pytest.approx(want)
    # the shared expert: one more group of the same launches over every token (20 / 2 = 10)
    shared = 10 * (c["w16a16"] * 256 * 128 + c["w4a16_g-1_asym"] * 128 * 128) / 1e4
    got = layer_us(pm, shape, gu, dn, gs, shared=("w16a16", "w4a16_g-1_asym"))
    assert got == pytest.approx(want + shared)
    with pytest.raises(ValueError, match="need 3 entries each"):
        layer_us(pm, shape, gu[:2], dn, gs)


def test_zipf_group_sizes_route_every_token_top_k_times():
    gs = zipf_group_sizes(512, 16, 4, seed=1)
    assert gs.sum() == 512 * 4 and gs.max() <= 512 and gs.dtype == np.int32
    assert gs.max() > 4 * gs.min() + 1  # skewed, not uniform
    assert (zipf_group_sizes(512, 16, 4, seed=1) == gs).all()
