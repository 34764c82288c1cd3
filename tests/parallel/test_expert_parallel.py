"""The expert-parallel MoE layer (``mxmoe_jax.parallel``) equals the single-device forward.

The 8-device checks run ``ep_check.py`` in a subprocess: the CPU device count is fixed when JAX
starts, and this process started it with one device. The reference is ``models.moe.moe_forward``
(tested against per-token NumPy loops in ``tests/models`` and ``tests/quantize``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mxmoe_jax.models import moe
from mxmoe_jax.parallel import ExpertParallelMoE, Placement, expert_mesh, shard_experts
from tests.parallel import ep_check, run_on_8_devices

DEVICES = (2, 4, 8)
CASES = ("random", "empty_expert", "all_to_one")


@pytest.fixture(scope="module")
def rows():
    return run_on_8_devices("tests.parallel.ep_check", *map(str, DEVICES))


def test_every_case_ran(rows):
    got = {(r["weights"], r["case"], r["devices"]) for r in rows}
    want = {(w, c, n) for w in ("bf16", "mixed") for c in CASES for n in DEVICES}
    assert want <= got
    assert any(r["placement"] == "by_kind4" for r in rows)


def test_sharded_layer_equals_single_device(rows):
    for r in rows:
        assert r["shape"] == [ep_check.T, ep_check.D], r
        assert r["scale"] > 1.0, r  # the outputs are not near zero: the comparison can fail
        # f32 outputs of the same row-wise products, summed in the same order: a few ulps
        assert r["err"] <= 1e-6 * r["scale"], r


def test_routing_cases_are_uneven(rows):
    for r in rows:
        loads = r["loads"]
        assert sum(loads) == ep_check.T * ep_check.K
        if r["case"] == "empty_expert":
            assert loads[5] == 0, r
        if r["case"] == "all_to_one":  # every token on expert 6 (and 1): six experts idle
            assert loads[6] == ep_check.T and loads.count(0) == ep_check.E - 2, r


def test_weights_are_sharded(rows):
    for r in rows:
        total, local = r["weight_rows"]
        assert r["weight_devices"] == r["devices"], r
        assert local * r["devices"] == total, r  # each device holds its own slots only
        if r["weights"] == "bf16":  # one scheme: E/N slots per device, no filler
            assert r["filler"] == 0 and local == ep_check.E // r["devices"], r
    # mixed on 2 devices (by hand from GATE_UP/DOWN): experts 0-3 and 4-7 are of 7 distinct
    # (gate_up, down) kinds, each at most once per device: 7 slots each, 14 - 8 = 6 fillers
    (r,) = [r for r in rows if r["weights"] == "mixed" and r["placement"] == "contiguous2"
            and r["case"] == "random"]
    assert r["filler"] == 6


def _two_kinds(e: int = 8) -> moe.ExpertWeights:
    """Experts 0..3 in one gate_up group, 4..7 in another (values: the expert index)."""
    w = jnp.arange(e, dtype=jnp.float32)[:, None, None] * jnp.ones((e, 2, 3))
    half = e // 2
    lo, hi = tuple(range(half)), tuple(range(half, e))
    return moe.ExpertWeights(
        gate_up=(moe.SchemeGroup(w=w[np.array(lo)], experts=lo, scheme=moe.W16A16),
                 moe.SchemeGroup(w=w[np.array(hi)], experts=hi, scheme=moe.W16A16)),
        down=(moe.SchemeGroup(w=w, experts=tuple(range(e)), scheme=moe.W16A16),), num_experts=e)


def test_by_kind_placement_avoids_filler_slots():
    """Two scheme pairs of 4 experts on 2 devices. Contiguous: device 0 holds the 4 of one pair,
    device 1 the 4 of the other, so each needs 4 + 4 slots (8 fillers). By kind: 2 + 2 each."""
    ew = _two_kinds()
    contiguous = shard_experts(ew, Placement.contiguous(8, 2))
    assert contiguous.num_slots == 8 and contiguous.filler_slots == 8
    p = Placement.by_kind(ew, 2)
    assert p.device_of == (0, 1, 0, 1, 0, 1, 0, 1)
    s = shard_experts(ew, p)
    assert s.num_slots == 4 and s.filler_slots == 0
    # device 0's slots hold experts 0, 2 (first group) and 4, 6 (second); device 1 the others
    np.testing.assert_array_equal(np.asarray(s.weights.gate_up[0].w)[:, 0, 0], [0, 2, 1, 3])
    np.testing.assert_array_equal(np.asarray(s.weights.down[0].w)[:, 0, 0],
                                  [0, 2, 4, 6, 1, 3, 5, 7])


def test_capacity_drops_the_pairs_past_it():
    """One device (this process), ``capacity=C``: the first C (token, slot) pairs in token order
    are kept, the rest contribute nothing. With top-2 and C = 2 * 5, tokens 0..4 get the full
    forward, tokens 5.. only the shared expert (= moe_forward with zero routed experts)."""
    block = ep_check.make_block(jnp.float32)
    x = ep_check.routing_case(block, "random", np.random.default_rng(2))[:12]
    fwd = nnx.jit(lambda b, v, r: moe.moe_forward(b, v, routed=r))
    routed = block.experts.weights()
    full = np.asarray(fwd(block, x, routed))
    zero = moe.ExpertWeights.dense(*(jnp.zeros_like(a) for a in (
        block.experts.gate[...], block.experts.up[...], block.experts.down[...])))
    shared_only = np.asarray(fwd(block, x, zero))
    got = np.asarray(ExpertParallelMoE(block, expert_mesh(1), capacity=2 * 5)(x))
    assert np.abs(full[5:] - shared_only[5:]).max() > 1.0  # the dropped pairs mattered
    np.testing.assert_allclose(got[:5], full[:5], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[5:], shared_only[5:], rtol=0, atol=1e-5)


def test_placement_checks():
    assert Placement.contiguous(8, 4).device_of == (0, 0, 1, 1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="num_devices"):
        Placement.contiguous(6, 4)
    with pytest.raises(ValueError, match="hold no expert"):
        Placement(device_of=(0, 0, 2, 2), num_devices=3)
    with pytest.raises(ValueError, match="not in"):
        Placement(device_of=(0, 5), num_devices=2)
    with pytest.raises(ValueError, match="num_devices"):
        expert_mesh(len(jax.devices()) + 1)


def test_shard_experts_slots():
    """Slots by (gate_up, down) kind, the same run on every device; fillers copy an expert."""
    e = 4
    w = jnp.arange(e, dtype=jnp.float32)[:, None, None] * jnp.ones((e, 2, 3))
    ew = moe.ExpertWeights(
        gate_up=(moe.SchemeGroup(w=w[np.array([0, 1, 2])], experts=(0, 1, 2), scheme=moe.W16A16),
                 moe.SchemeGroup(w=w[np.array([3])], experts=(3,), scheme=moe.W16A16)),
        down=(moe.SchemeGroup(w=w, experts=(0, 1, 2, 3), scheme=moe.W16A16),), num_experts=e)
    s = shard_experts(ew, Placement.contiguous(e, 2))
    # device 0: experts 0, 1 (kind A); device 1: 2 (kind A), 3 (kind B): A needs 2 slots, B 1
    assert s.num_slots == 3 and s.filler_slots == 2
    assert s.dest == (0, 0, 1, 1) and s.slot == (0, 1, 0, 2)
    ga, gb = s.weights.gate_up
    assert ga.experts == (0, 1) and gb.experts == (2,)
    np.testing.assert_array_equal(np.asarray(ga.w)[:, 0, 0], [0, 1, 2, 0])  # dev0 0,1; dev1 2,fill
    np.testing.assert_array_equal(np.asarray(gb.w)[:, 0, 0], [3, 3])  # dev0 fill; dev1 3
    np.testing.assert_array_equal(np.asarray(s.weights.down[0].w)[:, 0, 0], [0, 1, 0, 2, 0, 3])


@pytest.mark.slow
def test_sharded_layer_on_the_pallas_kernels():
    """The mixed layer in bf16 on the Pallas kernels (interpret mode: the kernel bodies on the
    CPU) inside ``shard_map`` on 2 devices equals the single-device forward on the same kernels
    (the one-launch mixed kernel per device; ~50 s of interpret-mode compilation)."""
    rows = run_on_8_devices("tests.parallel.ep_check", "--interpret", "2", timeout=900)
    assert {r["case"] for r in rows} == {"random", "all_to_one"}
    for r in rows:
        assert r["scale"] > 1.0, r
        # the same kernel on the same rows (0.0 observed); a bf16 rounding of h may flip
        assert r["err"] <= 1e-3 * r["scale"], r
