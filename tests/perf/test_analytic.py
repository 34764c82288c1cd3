"""The analytic roofline table and PerfModel lookups."""

from __future__ import annotations

import json

import pytest

from mxmoe_jax.perf import (
    DEVICES,
    PRESETS,
    PerfModel,
    analytic_table,
    gemm_time_us,
    get_device,
    load_shapes,
    shapes_from_hf_config,
)
from mxmoe_jax.perf.analytic import candidate_tiles
from mxmoe_jax.quant.scheme import QScheme
from tests.conftest import TINY_MODEL, require_shared


def best_us(device, scheme, m, n, k):
    s = QScheme.parse(scheme)
    return min(gemm_time_us(device, s, t, m, n, k) for t in candidate_tiles(s, k, device))


def test_devices_are_labelled_and_cited():
    assert set(DEVICES) >= {"H200", "H100", "A100", "RTX4090"}
    assert DEVICES["H200"].measured and "BENCHMARKS.md" in DEVICES["H200"].source
    for name in ("H100", "A100", "RTX4090"):
        assert not DEVICES[name].measured and "datasheet" in DEVICES[name].source
    assert DEVICES["A100"].fp8_tflops is None
    assert get_device("rtx 4090") is DEVICES["RTX4090"]
    with pytest.raises(ValueError, match="unknown; choose one of"):
        get_device("TPU")


def test_h200_decode_gemms_match_the_measured_kernels():
    """BENCHMARKS.md (measured on the H200, M=16, K=N=16384): bf16 136 µs, int8 117, int4 90-93."""
    h200 = DEVICES["H200"]
    for scheme, measured in (("w16a16", 136), ("w8a16_g-1_sym", 117), ("w4a16_g128_sym", 91.5)):
        assert best_us(h200, scheme, 16, 16384, 16384) == pytest.approx(measured, rel=0.12)


def test_h200_big_gemms_are_compute_bound_at_the_measured_rates():
    h200 = DEVICES["H200"]
    flops = 2.0 * 8192**3
    assert best_us(h200, "w16a16", 8192, 8192, 8192) == pytest.approx(flops / 604e6, rel=0.1)
    assert best_us(h200, "w8a8_g-1_sym", 8192, 8192, 8192) == pytest.approx(flops / 1000e6,
                                                                              rel=0.1)


@pytest.mark.parametrize("device", ["H200", "A100"])
def test_time_grows_with_tokens_and_quantized_weights_help_small_batches(device):
    d = DEVICES[device]
    ts = [best_us(d, "w4a16_g128_asym", m, 2816, 2048) for m in (1, 16, 256, 4096)]
    assert ts == sorted(ts)
    assert best_us(d, "w4a16_g128_asym", 16, 16384, 16384) < best_us(d, "w16a16", 16, 16384,
                                                                        16384)
    assert best_us(d, "w8a8_g-1_sym", 8192, 4096, 4096) < best_us(d, "w16a16", 8192, 4096, 4096)


def test_table_skips_what_the_device_or_shape_cannot_run():
    tab = analytic_table(DEVICES["A100"], [(384, 256), (256, 192)],
                         schemes=["w16a16", "w8a8_g-1_fp8", "w4a16_g128_asym"], ms=(1, 64))
    why = {(s["scheme"], s["k"]): s["why"] for s in tab["skipped"]}
    assert "FP8" in why[("w8a8_g-1_fp8", 256)]
    assert "does not divide K=192" in why[("w4a16_g128_asym", 192)]
    pm = PerfModel(tab)
    assert pm.source == "analytic" and pm.device == "A100"
    assert pm.has("w4a16_g128_asym", 384, 256) and not pm.has("w4a16_g128_asym", 256, 192)
    assert tab["points"] and all(set(p["tile"]) == {"bm", "bn", "bk", "split_k", "num_warps",
                                                    "num_stages"} for p in tab["points"])


def _table(points, **extra):
    return {"format": "mxmoe-jax/perf/1", "source": "measured", "device": "X", "points": points,
            **extra}


def _pt(m, t, bm=16):
    return {"scheme": "w4a16_g128_asym", "m": m, "n": 64, "k": 128, "time_us": t,
            "tile": {"bm": bm, "bn": 64, "bk": 64, "split_k": 1, "num_warps": 4, "num_stages": 3}}


def test_perf_model_takes_the_best_tile_and_interpolates_over_m():
    pm = PerfModel(_table([_pt(8, 10.0), _pt(8, 8.0, bm=32), _pt(32, 20.0), _pt(64, 30.0)]))
    assert pm.cost_us("w4a16_g128_asym", 0, 64, 128) == 0.0
    assert pm.cost_us("w4a16_g128_asym", 8, 64, 128) == 8.0  # best of two tiles
    assert pm.cost_us("w4a16_g128_asym", 4, 64, 128) == 8.0  # below the table: its first point
    assert pm.cost_us("w4a16_g128_asym", 20, 64, 128) == pytest.approx(14.0)
    assert pm.cost_us("w4a16_g128_asym", 96, 64, 128) == pytest.approx(40.0)  # extrapolated
    assert pm.best_tile("w4a16_g128_asym", 8, 64, 128)["bm"] == 32
    with pytest.raises(ValueError, match="no entry for scheme w8a8_g-1_sym at n=64, k=128"):
        pm.cost_us("w8a8_g-1_sym", 8, 64, 128)


def test_perf_model_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="format"):
        PerfModel(_table([], format="other"))
    with pytest.raises(ValueError, match="source must be"):
        PerfModel(_table([], source="guessed"))
    with pytest.raises(ValueError, match=r"points\[0\] is malformed"):
        PerfModel(_table([{"scheme": "w4a16_g128_asym"}]))
    with pytest.raises(FileNotFoundError, match="mxmoe-jax profile"):
        PerfModel.load(tmp_path / "none.json")


def test_shapes_from_presets_and_hf_configs(tmp_path):
    q = PRESETS["qwen1.5-moe"]
    assert q.gemms() == [(2816, 2048), (2048, 1408), (11264, 2048), (2048, 5632)]
    ds = shapes_from_hf_config({"model_type": "deepseek_v2", "hidden_size": 2048,
                                "moe_intermediate_size": 1408, "n_routed_experts": 64,
                                "num_experts_per_tok": 6, "n_shared_experts": 2,
                                "first_k_dense_replace": 1, "num_hidden_layers": 27})
    assert (ds.shared_inter, ds.num_moe_layers) == (2816, 26)
    mx = shapes_from_hf_config({"model_type": "mixtral", "hidden_size": 64,
                                "intermediate_size": 96, "num_local_experts": 4,
                                "num_experts_per_tok": 2})
    assert mx.gemms() == [(192, 64), (64, 96)]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not supported"):
        load_shapes(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="preset"):
        load_shapes("no-such-model")


def test_shapes_of_the_tiny_model():
    tiny = load_shapes(str(require_shared(TINY_MODEL)))
    assert (tiny.hidden, tiny.moe_inter, tiny.num_experts, tiny.shared_inter) == (256, 192, 16,
                                                                                  768)


def test_profile_cli_writes_a_loadable_table(tmp_path, capsys):
    from mxmoe_jax.cli import main

    out = tmp_path / "perf.json"
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 128,
                               "moe_intermediate_size": 64, "num_experts": 4,
                               "num_experts_per_tok": 2, "num_hidden_layers": 2}))
    assert main(["profile", "--analytic", "H100", "--shapes", str(cfg), "--out", str(out),
                 "--schemes", "w16a16", "w8a8_g-1_sym"]) == 0
    pm = PerfModel.load(out)
    assert pm.label == "analytic perf table, H100"
    assert pm.cost_us("w8a8_g-1_sym", 3, 128, 128) > 0
    assert main(["profile", "--analytic", "H100", "--shapes", str(cfg), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
