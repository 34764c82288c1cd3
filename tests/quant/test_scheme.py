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


@pytest.mark.parametrize("name, k, want", [
    ("w4a16_g128_asym", 2048, "w4a16_g128_asym"),  # divides: unchanged
    ("w4a16_g128_asym", 192, "w4a16_g96_asym"),  # largest multiple of 16 <= 128 dividing 192
    ("w4a4_g128_sym", 192, "w4a4_g96_sym"),  # weight-activation: the same rule (shared G)
    ("w4a16_g32_asym", 48, "w4a16_g16_asym"),
    ("w4a16_g256_asym", 384, "w4a16_g128_asym"),  # a multiple of 128 (the kernels') before 192
    ("w4a16_g128_asym", 64, "w4a16_g-1_asym"),  # K below the group: one group = per channel
    ("w4a16_g128_asym", 96, "w4a16_g-1_asym"),
    ("w4a16_g128_asym", 200, "w4a16_g-1_asym"),  # no multiple of 16 divides K
    ("w4a16_g64_asym", 8, "w4a16_g-1_asym"),
    ("w4a16_g-1_asym", 192, "w4a16_g-1_asym"),
    ("w8a8_g-1_fp8", 100, "w8a8_g-1_fp8"),
    ("w16a16", 7, "w16a16"),
])
def test_for_k_substitutes_a_group_size_that_does_not_divide_k(name, k, want):
    s = QScheme.parse(name)
    got = s.for_k(k)
    assert got.name == want
    assert got.scale_groups(k) >= 0  # always valid for this K
    if want == name:
        assert got is s


def test_for_k_rejects_an_empty_k():
    with pytest.raises(ValueError, match="k: 0"):
        QScheme.parse("w4a16_g128_asym").for_k(0)


def test_kernel_group_multiple_is_the_kernels():
    from mxmoe_jax.kernels.pallas.grouped_gemm import supports

    from mxmoe_jax.quant import packing
    from mxmoe_jax.quant.scheme import KERNEL_GROUP_MULTIPLE

    assert KERNEL_GROUP_MULTIPLE == packing.CHUNK
    s = QScheme.parse("w4a16_g256_asym")
    assert supports(s.for_k(384), 384) and not supports(QScheme.parse("w4a16_g192_asym"), 384)
    assert supports(QScheme.parse("w4a16_g128_asym").for_k(64), 64)  # per channel


def test_for_block_notes_each_substitution_once(capsys, monkeypatch):
    from mxmoe_jax.quant import scheme as scheme_mod
    from mxmoe_jax.quant.scheme import for_block

    monkeypatch.setattr(scheme_mod, "_NOTED", set())
    s = QScheme.parse("w3a16_g128_sym")
    assert for_block(s, 2048, "gate_proj/up_proj") is s
    assert capsys.readouterr().err == ""
    assert for_block(s, 1200, "down_proj").name == "w3a16_g80_sym"
    assert for_block("w3a16_g128_sym", 1200, "shared down_proj").name == "w3a16_g80_sym"
    err = capsys.readouterr().err
    assert err == ("w3a16_g128_sym: group size 128 does not divide down_proj K=1200; using "
                   "w3a16_g80_sym there\n")
