"""`run`'s profile stage tabulates the schemes solve will look up: each candidate and what
`QScheme.for_k` makes of it in the model's GEMMs."""

from __future__ import annotations

from mxmoe_jax.pipeline import WEIGHT_ONLY_SCHEMES, _with_substitutes
from tests.conftest import FIXTURES

HF = FIXTURES / "hf" / "qwen2_moe_norm"  # K = 64 (gate/up), 32 (routed down), 48 (shared down)


def test_profiled_schemes_include_the_substitutes():
    got = _with_substitutes(["w4a16_g32_asym", "w8a16_g-1_asym"], HF)
    assert got == ["w4a16_g32_asym", "w8a16_g-1_asym", "w4a16_g16_asym"]
    # the default set on K <= 64: g128 is per channel everywhere
    got = _with_substitutes(WEIGHT_ONLY_SCHEMES, HF)
    assert got[:len(WEIGHT_ONLY_SCHEMES)] == list(WEIGHT_ONLY_SCHEMES)
    assert set(got[len(WEIGHT_ONLY_SCHEMES):]) == {"w2a16_g-1_asym", "w3a16_g-1_asym",
                                                   "w4a16_g-1_asym"}
