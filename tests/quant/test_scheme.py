"""QScheme: names round-trip, storage bits as documented, canonical grids, clear errors."""

import pytest

from mxmoe_jax.quant.scheme import ORIGINAL_SCHEMES, W16A16, QScheme

NAMES = [*ORIGINAL_SCHEMES, "w8a8_g-1_fp8", "w16a16", "w4a16_g-1_sym", "w2a16_g64_asym",
         "w4a8_g-1_sym", "w8a16_g128_sym"]


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip(name):
    s = QScheme.parse(name)
    assert s.name == name == str(s)
    assert QScheme.parse(s) is s
    assert QScheme.parse(name.upper()) == s


@pytest.mark.parametrize("name, bits", [
    # the original's solver costs (its facts sheet §2) where they agree with 16-bit scale+zero
    ("w4a16_g128_asym", 4.25), ("w3a16_g128_asym", 3.25), ("w2a16_g128_asym", 2.25),
    ("w4a16_g-1_asym", 4.0), ("w8a8_g-1_sym", 8.0), ("w4a4_g-1_sym", 4.0),
    # symmetric groups carry only a scale: 16 / 128
    ("w4a4_g128_sym", 4.125), ("w2a16_g64_asym", 2.5), ("w16a16", 16.0),
])
def test_bits_per_weight_counts_scales_and_offsets(name, bits):
    assert QScheme.parse(name).bits_per_weight() == bits


def test_per_channel_scales_count_when_k_is_given():
    assert QScheme.parse("w4a16_g-1_asym").bits_per_weight(k=2048) == 4 + 32 / 2048
    assert QScheme.parse("w8a8_g-1_sym").bits_per_weight(k=1408) == 8 + 16 / 1408
    assert QScheme.parse("w4a16_g128_asym").bits_per_weight(k=2048) == 4.25


def test_canonical_grids():
    s4, a4 = QScheme.parse("w4a16_g128_sym"), QScheme.parse("w4a16_g128_asym")
    assert (s4.qmin, s4.qmax) == (-7, 7) and (a4.qmin, a4.qmax) == (0, 15)
    s8 = QScheme.parse("w8a8_g-1_sym")
    assert (s8.qmin, s8.qmax, s8.a_qmax) == (-127, 127, 127)
    assert QScheme.parse("w4a4_g-1_sym").a_qmax == 7
    with pytest.raises(ValueError, match="no integer grid"):
        _ = W16A16.qmin


def test_scale_groups():
    s = QScheme.parse("w4a16_g128_asym")
    assert s.scale_groups(2048) == 16 and QScheme.parse("w4a16_g-1_asym").scale_groups(192) == 1
    with pytest.raises(ValueError, match="does not divide K=192"):
        s.scale_groups(192)


@pytest.mark.parametrize("bad, why", [
    ("w4a4_g128_asym", "must be symmetric"), ("w5a16_g-1_sym", "w_bits"), ("w4a16", "_g"),
    ("nonsense", "expected"), ("w8a8_g128_fp8", "fp8"), ("w4a16_g100_asym", "multiple of 16"),
    ("w2a8_g-1_sym", "not supported"), ("w16a16_g128_asym", "w16a16"),
])
def test_nonsense_is_rejected_with_the_reason(bad, why):
    with pytest.raises(ValueError, match=why):
        QScheme.parse(bad)
