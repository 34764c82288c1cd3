"""The allocation MILP with expert parallelism (``Units.device``): T is the launch time plus the
replicated units' time plus the BUSIEST device's, and the search still finds the exact optimum of
``r log L + (1 - r) log T`` (against brute force with T computed here, not by ``Units``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("pulp", reason="the solver needs PuLP, which is not installed here")

from mxmoe_jax.alloc.milp import Units, objective, solve_tradeoff  # noqa: E402

# 6 units: 2 devices x 2 units, plus 2 replicated (a shared expert's gate_up and down)
DEVICE = np.array([0, 0, 1, 1, -1, -1])


def toy(seed: int, device=DEVICE, schemes: int = 3) -> Units:
    rng = np.random.default_rng(seed)
    u = len(device)
    bits = np.sort(rng.choice([2.25, 3.25, 4.25, 8.0, 16.0], size=schemes, replace=False))
    size = rng.integers(1, 4, size=u).astype(float) * 1000
    loss = rng.gamma(2.0, 1.0, size=(u, schemes)) * (16.0 / bits)
    # device 1's units see ~3x the tokens: a placement the allocation has to balance
    load = np.where(device == 1, 3.0, 1.0)[:, None]
    time = load * rng.uniform(0.5, 2.0, size=(u, schemes)) * (bits / 8) ** rng.uniform(0, 1)
    return Units(loss=loss, time=time, wbits=bits[None, :] * size[:, None],
                 abits=np.full((u, schemes), 16.0) * size[:, None], size=size, t0=1.0,
                 device=np.asarray(device))


def t_parallel(units: Units, choice) -> float:
    """T by hand: t0 + replicated units + max over devices of their units' times."""
    t = [units.time[u, s] for u, s in enumerate(choice)]
    per = {}
    for u, d in enumerate(DEVICE):
        if d >= 0:
            per[d] = per.get(d, 0.0) + t[u]
    return units.t0 + sum(t[u] for u in range(len(t)) if DEVICE[u] < 0) + max(per.values())


def feasible(units: Units, wbudget: float):
    u, s = units.loss.shape
    for choice in itertools.product(range(s), repeat=u):
        w = sum(units.wbits[i, c] for i, c in enumerate(choice)) / units.size.sum()
        if w <= wbudget + 1e-12:
            yield choice, sum(units.loss[i, c] for i, c in enumerate(choice)), \
                t_parallel(units, choice)


def test_evaluate_takes_the_busiest_device():
    units = toy(0)
    choice = np.array([0, 1, 2, 0, 1, 2])
    assert units.evaluate(choice)["T"] == pytest.approx(t_parallel(units, choice), rel=1e-12)
    per = units.device_times(units.time[np.arange(6), choice])
    assert per.shape == (2,)
    assert per[1] == pytest.approx(units.time[2, 2] + units.time[3, 0])


@pytest.mark.parametrize("seed", range(6))
def test_device_milp_matches_brute_force(seed):
    units = toy(seed)
    lo = units.min_avg_wbits()
    hi = float(units.wbits.max(axis=1).sum() / units.size.sum())
    w = lo + 0.45 * (hi - lo)
    points = list(feasible(units, w))
    for r in (0.0, 0.5, 1.0):
        got = solve_tradeoff(units, wbudget=w, r=r, hull=0).chosen
        assert got.wbits <= w + 1e-12
        assert got.T == pytest.approx(t_parallel(units, got.choice), rel=1e-9)
        best = min(objective(L, T, r) for _, L, T in points)
        assert objective(got.L, got.T, r) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_balancing_beats_the_one_device_allocation():
    """At r = 0 (time only) the device-aware optimum's busiest device is no slower than that of
    the allocation solved for one device, and strictly faster on some instance."""
    strict = False
    for seed in range(6):
        units = toy(seed)
        one = Units(**{f: getattr(units, f) for f in ("loss", "time", "wbits", "abits", "size",
                                                       "t0")})
        lo = units.min_avg_wbits()
        w = lo + 0.3 * (float(units.wbits.max(axis=1).sum() / units.size.sum()) - lo)
        par = solve_tradeoff(units, wbudget=w, r=0.0, hull=0).chosen
        ser = solve_tradeoff(one, wbudget=w, r=0.0, hull=0).chosen
        t_par, t_ser = t_parallel(units, par.choice), t_parallel(units, ser.choice)
        assert t_par <= t_ser + 1e-9
        strict |= t_par < t_ser - 1e-9
    assert strict


def test_device_shape_is_checked():
    with pytest.raises(ValueError, match="device"):
        toy(0, device=np.array([-1, -1, -1, -1, -1, -1]))


# ------------------------------------------------------------------ solve_allocation --devices

def _synthetic():
    from mxmoe_jax.alloc.check_uniform import perf_for_trace
    from mxmoe_jax.alloc.problem import build_inputs
    from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace

    schemes = ["w16a16", "w8a8_g-1_sym", "w4a16_g128_asym", "w4a16_g-1_asym"]
    trace = synthetic_trace(num_layers=2, num_experts=8, top_k=2, moe_inter=128, hidden=256,
                            shared_ratio=2.0, num_tokens=512, seed=5)
    inputs = build_inputs(trace, synthetic_loss(trace, schemes, seed=5),
                          perf_for_trace(trace, schemes), batch=256)
    return inputs, schemes


def _hand_t(ld, assignment: dict, schemes, devices: int) -> tuple[float, list[float]]:
    """A layer's T from LayerData's per-(expert, group, scheme) times: t0 + shared / N + the
    busiest device of a contiguous placement (routed experts 0..7, the shared one last)."""
    n_routed = len(ld.experts) - 1
    per_dev = [0.0] * devices
    shared = 0.0
    for i, e in enumerate(ld.experts):
        a = assignment[e]
        t = sum(ld.time[i, g, schemes.index(a[b])] for g, b in enumerate(("gate", "down")))
        if i < n_routed:
            per_dev[i // (n_routed // devices)] += t
        else:
            shared = t / devices
    return ld.t0 + shared + max(per_dev), per_dev


def test_solve_allocation_balances_devices():
    from mxmoe_jax.alloc.solve import SolveConfig, solve_allocation

    inputs, schemes = _synthetic()
    res = solve_allocation(inputs, SolveConfig(wbits=4.5, r=0.75, hull=0, devices=2),
                           progress=False)
    q = res.qconfig
    for ld in inputs.layers:
        row = q["summary"]["layers"][ld.layer]
        t, per_dev = _hand_t(ld, q["layers"][ld.layer], schemes, 2)
        assert row["T_us"] == pytest.approx(t, rel=1e-9)
        assert row["device_us"] == pytest.approx(per_dev, rel=1e-6, abs=1e-3)
    with pytest.raises(ValueError, match="mode 'layer'"):
        SolveConfig(wbits=4.5, devices=2, mode="model")
    with pytest.raises(ValueError, match="does not divide"):
        solve_allocation(inputs, SolveConfig(wbits=4.5, r=0.75, hull=0, devices=3),
                         progress=False)


def test_solve_cli_devices(tmp_path):
    """``mxmoe-jax solve --devices 2`` writes the balanced allocation and its device times."""
    import json

    from mxmoe_jax.alloc.check_uniform import perf_for_trace
    from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace
    from mxmoe_jax.cli import main as cli

    schemes = ["w16a16", "w8a8_g-1_sym", "w4a16_g128_asym", "w4a16_g-1_asym"]
    trace = synthetic_trace(num_layers=2, num_experts=8, top_k=2, moe_inter=128, hidden=256,
                            shared_ratio=2.0, num_tokens=512, seed=5)
    paths = {}
    for name, obj in (("trace", trace), ("loss", synthetic_loss(trace, schemes, seed=5)),
                      ("perf", perf_for_trace(trace, schemes).table)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    out = tmp_path / "q.json"
    assert cli(["solve", "--trace", str(paths["trace"]), "--loss", str(paths["loss"]), "--perf",
                str(paths["perf"]), "--batch", "256", "--wbits", "4.5", "--r", "0.75",
                "--hull", "0", "--devices", "2", "--out", str(out), "--no-plots"]) == 0
    layers = json.loads(out.read_text())["summary"]["layers"]
    assert layers and all(len(row["device_us"]) == 2 for row in layers.values())
