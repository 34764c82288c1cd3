"""The MILP against brute force on toy instances (3 experts x 2 block groups x 3 schemes)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

pytest.importorskip("pulp", reason="the solver needs PuLP, which is not installed here")

from mxmoe_jax.alloc.milp import BudgetError, Units, objective, solve_tradeoff

SEEDS = range(12)


def toy(seed: int, units: int = 6, schemes: int = 3) -> Units:
    """Random Δ and costs; cheaper bits lose more and (mostly) run faster, as in practice."""
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.choice([2.25, 3.25, 4.25, 8.0, 16.0], size=schemes, replace=False))
    size = rng.integers(1, 4, size=units).astype(float) * 1000
    loss = rng.gamma(2.0, 1.0, size=(units, schemes)) * (16.0 / bits)  # fewer bits, more loss
    time = rng.uniform(0.5, 2.0, size=(units, schemes)) * (bits / 8) ** rng.uniform(0, 1)
    return Units(loss=loss, time=time, wbits=bits[None, :] * size[:, None],
                 abits=np.full((units, schemes), 16.0) * size[:, None], size=size, t0=1.0)


def brute(units: Units, wbudget: float) -> list[tuple[float, float]]:
    """(L, T) of every feasible assignment."""
    u, s = units.loss.shape
    out = []
    for choice in itertools.product(range(s), repeat=u):
        ev = units.evaluate(np.array(choice))
        if ev["wbits"] <= wbudget + 1e-12:
            out.append((ev["L"], ev["T"]))
    return out


def budget_for(units: Units, frac: float) -> float:
    lo = units.min_avg_wbits()
    hi = float(units.wbits.max(axis=1).sum() / units.size.sum())
    return lo + frac * (hi - lo)


@pytest.mark.parametrize("seed", SEEDS)
def test_endpoints_and_product_optimum_match_brute_force(seed):
    units = toy(seed)
    w = budget_for(units, 0.45)
    feasible = brute(units, w)
    for r in (1.0, 0.0, 0.25, 0.5, 0.75):
        sol = solve_tradeoff(units, wbudget=w, r=r, hull=0)
        got = sol.chosen
        assert got.wbits <= w + 1e-12
        if r == 1.0:
            assert got.L == pytest.approx(min(L for L, _ in feasible), rel=1e-9, abs=1e-12)
        elif r == 0.0:
            assert got.T == pytest.approx(min(T for _, T in feasible), rel=1e-9)
        else:
            best = min(objective(L, T, r) for L, T in feasible)
            assert got.f(r) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_cbc_agrees_with_highs(seed):
    units = toy(seed)
    w = budget_for(units, 0.6)
    a = solve_tradeoff(units, wbudget=w, r=0.6, solver="highs").chosen
    b = solve_tradeoff(units, wbudget=w, r=0.6, solver="cbc").chosen
    assert a.f(0.6) == pytest.approx(b.f(0.6), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_frontier_points_solve_the_epsilon_constraint_program(seed):
    """Grid and hull points are min L under T <= τ (τ = the grid's, or the point's own T)."""
    units = toy(seed)
    w = budget_for(units, 0.5)
    feasible = brute(units, w)
    sol = solve_tradeoff(units, wbudget=w, r=0.5, grid=4, grid_gap=0.0, hull=10)
    assert len(sol.grid) == 6 and len(sol.hull) >= 2
    for p in sol.grid + sol.hull:
        tau = p.T if p.tau is None else p.tau
        assert p.T <= tau * (1 + 1e-9)
        assert min(L for L, T in feasible if T <= tau * (1 + 1e-12)) == pytest.approx(p.L,
                                                                                     rel=1e-9)


def test_infeasible_budget_names_the_smallest_feasible_one():
    units = toy(0)
    lo = units.min_avg_wbits()
    with pytest.raises(BudgetError, match=r"smallest feasible budget is --wbits") as err:
        solve_tradeoff(units, wbudget=lo - 0.01, r=1.0)
    assert err.value.min_wbits == pytest.approx(lo)
    sol = solve_tradeoff(units, wbudget=math.ceil(lo * 1e4) / 1e4, r=1.0)  # the printed one works
    assert sol.chosen.wbits <= lo + 1e-4


def test_activation_budget_is_respected_and_infeasible_one_is_named():
    units = toy(1)
    abits = units.abits.copy()
    abits[:, 0] = 8.0 * units.size  # scheme 0 quantizes activations
    units = Units(loss=units.loss, time=units.time, wbits=units.wbits, abits=abits,
                  size=units.size)
    w = budget_for(units, 1.0)
    sol = solve_tradeoff(units, wbudget=w, abudget=10.0, r=1.0)
    assert sol.chosen.abits <= 10.0 + 1e-12
    with pytest.raises(BudgetError, match="--abits 7 is infeasible.*--abits 8"):
        solve_tradeoff(units, wbudget=w, abudget=7.0, r=1.0)
