"""`alloc.scale`: a small model's trace and loss pattern mapped onto a preset's layer shapes."""

from __future__ import annotations

import numpy as np
import pytest

from mxmoe_jax.alloc.scale import scale_loss, scale_trace
from mxmoe_jax.perf.shapes import MoEShapes

SMALL_TRACE = {
    "format": "mxmoe-jax/trace/1", "model": "small", "topk": 2, "NK": [64, 32], "num_layers": 2,
    "num_tokens": 100, "num_samples": 1, "num_shared_experts": 2.0, "moe_layers": [0, 1],
    "layer-0": {"access_freq": [10, 30, 60, 100]},
    "layer-1": {"access_freq": [50, 50, 50, 50]},
}


def _loss(with_shared: bool):
    rows = lambda base: {str(e): [base + e, base + e + 0.5, base + 2 * e] for e in range(4)}  # noqa: E731
    losses = {}
    for s, scale in (("w2a16_g-1_asym", 10.0), ("w4a16_g-1_asym", 1.0)):
        per = {}
        for layer in range(2):
            r = {k: [scale * v for v in vals] for k, vals in rows(10 * layer).items()}
            if with_shared:
                r["4"] = [scale * 7.0, scale * 8.0, scale * 9.0]
            per[str(layer)] = r
        losses[s] = per
    return {"format": "mxmoe-jax/loss/1", "meta": {}, "losses": losses}


PRESET = MoEShapes(name="p", hidden=128, moe_inter=96, num_experts=6, top_k=3, shared_inter=192,
                   num_moe_layers=4)


def test_trace_maps_layers_and_experts_and_renormalises_tokens():
    t = scale_trace(SMALL_TRACE, PRESET)
    assert t["NK"] == [96, 128] and t["topk"] == 3 and t["moe_layers"] == [0, 1, 2, 3]
    assert t["num_shared_experts"] == 2.0
    for layer, src in ((0, 0), (1, 0), (2, 1), (3, 1)):  # floor(l * 2 / 4)
        f = np.asarray(t[f"layer-{layer}"]["access_freq"])
        assert len(f) == 6 and f.sum() == pytest.approx(100 * 3)
        pattern = np.asarray(SMALL_TRACE[f"layer-{src}"]["access_freq"], float)[[0, 1, 2, 3, 0, 1]]
        np.testing.assert_allclose(f, pattern / pattern.sum() * 300)


@pytest.mark.parametrize("with_shared", [True, False])
def test_loss_copies_rows_by_the_same_map_and_fills_the_shared_expert(with_shared):
    small = _loss(with_shared)
    trace = dict(SMALL_TRACE, num_shared_experts=2.0 if with_shared else 0)
    out = scale_loss(small, trace, PRESET)
    assert set(out["losses"]) == set(small["losses"])
    for s, per in out["losses"].items():
        assert sorted(per, key=int) == ["0", "1", "2", "3"]
        for layer, src in ((0, 0), (1, 0), (2, 1), (3, 1)):
            src_rows = small["losses"][s][str(src)]
            for e in range(6):
                assert per[str(layer)][str(e)] == src_rows[str(e % 4)]
            want = (src_rows["4"] if with_shared else
                    list(np.mean([src_rows[str(e)] for e in range(4)], axis=0)))
            np.testing.assert_allclose(per[str(layer)]["6"], want)
    assert out["meta"]["scaled_from"]["shapes"] == "p"


def test_a_preset_without_shared_experts_gets_none():
    p = MoEShapes(name="q", hidden=128, moe_inter=96, num_experts=3, top_k=1, num_moe_layers=1)
    out = scale_loss(_loss(True), SMALL_TRACE, p)
    assert set(out["losses"]["w2a16_g-1_asym"]["0"]) == {"0", "1", "2"}
    assert scale_trace(SMALL_TRACE, p)["num_shared_experts"] == 0
