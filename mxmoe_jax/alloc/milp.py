"""The allocation MILP and its exact loss/time trade-off: pure math, no model or file knowledge.

A problem is a set of *units* (one linear block group, or one whole expert), each taking exactly one
scheme ``s``: binary ``x[u, s]``, ``sum_s x[u, s] = 1``. With per-unit, per-scheme loss ``Δ[u, s]``,
time ``c[u, s]`` (µs), storage bits ``w[u, s]`` (bits per weight x elements) and activation bits
``a[u, s]``::

    L = Σ Δ x        T = t0 + Σ c x        Σ w x <= W · Σ size        (Σ a x <= A · Σ size)

MxMoE (paper §4.2) minimises ``L^r · T^(1-r)``, i.e. ``f = r log L + (1 - r) log T``, which is not
linear. Every minimiser of ``f`` is Pareto-optimal in (L, T), so we search the Pareto frontier with
the ε-constraint program ``P(τ) = min L s.t. T <= τ`` (linear; PuLP + HiGHS or CBC):

1. endpoints: the L-optimum (min L) and the T-optimum (min T, then min L at that T);
2. a display grid of ``grid`` τ values evenly between them (the frontier shown to the user), solved
   to a small relative gap ``grid_gap`` with warm starts: pictures, not proofs;
3. for 0 < r < 1, an exact search. Every point left of the L-optimum has ``L >= Lb`` (Lb = the
   largest L proven so far) and can beat the incumbent ``f*`` only if
   ``T < t* = exp((f* - r log Lb) / (1 - r))``. So probe ``P(τ)`` at ``τ = min(hi, t*) - res``: its
   solution C dominates everything with ``T_C <= T <= τ`` and proves ``L >= L_C`` below ``T_C``;
   continue with ``hi = T_C, Lb = L_C`` until ``τ`` drops below the T-optimum. Each probe is solved
   exactly (zero gap), so the result is the exact minimiser of ``f`` up to the T resolution ``res``
   (1e-6 of the largest unit time, above the solvers' row tolerance), which the tests check against
   brute force. It typically takes a handful of probes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time as _time

import numpy as np
import pulp

_TINY = 1e-300  # floors log(0): an L or T of zero beats every positive one


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Units:
    """The decision units of one MILP. Unavailable (unit, scheme) pairs have NaN loss or time."""

    loss: np.ndarray  # [u, s] Δ >= 0 (NaN: scheme not allowed for this unit)
    time: np.ndarray  # [u, s] µs >= 0 (NaN: not allowed)
    wbits: np.ndarray  # [u, s] storage bits: bits per weight (scales included) x elements
    abits: np.ndarray  # [u, s] activation bits x elements (parameter-weighted average)
    size: np.ndarray  # [u] weight elements of the unit
    t0: float = 0.0  # time every assignment pays (launches), µs, included in T

    def __post_init__(self):
        u, s = self.loss.shape
        for field in ("time", "wbits", "abits"):
            if getattr(self, field).shape != (u, s):
                raise ValueError(f"{field}: shape {getattr(self, field).shape}, expected {(u, s)}")
        if self.size.shape != (u,):
            raise ValueError(f"size: shape {self.size.shape}, expected {(u,)}")
        if not self.available.any(axis=1).all():
            bad = np.flatnonzero(~self.available.any(axis=1))[:5].tolist()
            raise ValueError(f"loss/time: units {bad} have no allowed scheme")
        ok = self.available
        if (self.loss[ok] < 0).any() or (self.time[ok] < 0).any():
            raise ValueError("loss/time: must be >= 0")

    @property
    def available(self) -> np.ndarray:
        return np.isfinite(self.loss) & np.isfinite(self.time)

    def evaluate(self, choice: np.ndarray) -> dict:
        """L, T and average bits of an assignment (``choice[u]`` = scheme index)."""
        idx = np.arange(len(choice))
        total = float(self.size.sum())
        return dict(L=float(self.loss[idx, choice].sum()),
                    T=float(self.t0 + self.time[idx, choice].sum()),
                    wbits=float(self.wbits[idx, choice].sum() / total),
                    abits=float(self.abits[idx, choice].sum() / total))

    def min_avg_wbits(self) -> float:
        """Smallest average weight bits any assignment reaches (without the activation budget)."""
        w = np.where(self.available, self.wbits, np.inf)
        return float(w.min(axis=1).sum() / self.size.sum())

    def min_avg_abits(self) -> float:
        a = np.where(self.available, self.abits, np.inf)
        return float(a.min(axis=1).sum() / self.size.sum())


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    """One solution on (or near) the Pareto frontier."""

    L: float
    T: float
    wbits: float
    abits: float
    choice: np.ndarray  # [u] scheme index
    kind: str  # "l_opt", "t_opt", "grid", "tangent" or "search"
    tau: float | None  # the T cap it was solved under (None for the endpoints' own solves)

    def f(self, r: float) -> float:
        return objective(self.L, self.T, r)


@dataclasses.dataclass(frozen=True, slots=True)
class Solution:
    chosen: Point  # minimiser of r log L + (1 - r) log T among the points found
    points: list[Point]  # every distinct point found, sorted by T
    grid: list[Point]  # the display grid, endpoints included, by increasing τ
    r: float
    solves: int  # MILPs solved
    seconds: float
    exact: bool  # False if the search hit max_solves or a MILP hit its time limit
    log: list  # (objective, tau, seconds, status) of every MILP


class BudgetError(ValueError):
    """No assignment meets the budget; ``min_wbits`` / ``min_abits`` say what would."""

    def __init__(self, msg: str, *, min_wbits: float | None = None, min_abits: float | None = None):
        super().__init__(msg)
        self.min_wbits = min_wbits
        self.min_abits = min_abits


def objective(L: float, T: float, r: float) -> float:
    """``r log L + (1 - r) log T``: the log of the paper's ``L^r T^(1-r)``."""
    out = 0.0
    if r > 0:
        out += r * math.log(max(L, _TINY))
    if r < 1:
        out += (1 - r) * math.log(max(T, _TINY))
    return out


def ceil_bits(x: float, digits: int = 4) -> float:
    """Round a bit budget up, so the printed value is itself feasible."""
    return math.ceil(x * 10**digits - 1e-6) / 10**digits


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints its banner from C on the first model of a process; keep stdout clean."""
    sys.stdout.flush()
    try:
        fd = os.dup(1)
    except OSError:  # no real stdout (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


SOLVERS = ("highs", "cbc")


def make_solver(name: str = "highs", *, gap: float = 0.0, warm: bool = False, threads: int = 1,
                time_limit: float | None = None):
    """A PuLP solver; ``gap`` = relative optimality gap (0 = exact, as the tests demand)."""
    if name == "highs":
        return pulp.HiGHS(msg=False, gapRel=gap, gapAbs=1e-12 if gap == 0 else None,
                          threads=threads, warmStart=warm, timeLimit=time_limit,
                          output_flag=False)
    if name == "cbc":
        # CBC preprocessing mis-reports feasible probes as infeasible at tight τ, and its warm
        # start (an .mst file) made feasible probes come back infeasible: both off
        return pulp.COIN_CMD(msg=False, gapRel=gap, gapAbs=0.0 if gap == 0 else None,
                             threads=threads, timeLimit=time_limit, options=["preprocess off"])
    raise ValueError(f"solver: {name!r} is not one of {SOLVERS}")


class _Model:
    """One PuLP model per unit set: the τ and L caps are constraints whose right sides change."""

    def __init__(self, units: Units, wbudget: float, abudget: float | None, solver: str,
                 time_limit: float | None = None):
        self.units = units
        self.solver_name = solver
        self.time_limit = time_limit
        self._solvers = {}
        self.solves = 0
        self.log: list[tuple] = []  # (objective, tau, seconds, status) per MILP
        self.proven = True  # False once a solve stopped at its time limit
        ok = units.available
        # Normalise loss and time so both objectives are O(1) per unit (solver tolerances are
        # absolute); the caps use the same scale.
        self.l_scale = float(np.nanmax(np.where(ok, units.loss, np.nan))) or 1.0
        self.t_scale = float(np.nanmax(np.where(ok, units.time, np.nan))) or 1.0
        total = float(units.size.sum())
        self.w_rhs = wbudget * total
        prob = pulp.LpProblem("mxmoe_alloc", pulp.LpMinimize)
        self.x: dict[tuple[int, int], pulp.LpVariable] = {}
        for u, s in zip(*np.nonzero(ok), strict=True):
            self.x[int(u), int(s)] = prob.add_variable(f"x_{u}_{s}", cat="Binary")
        by_unit: dict[int, list] = {}
        for (u, _s), v in self.x.items():
            by_unit.setdefault(u, []).append(v)
        for u, vs in by_unit.items():
            prob += pulp.lpSum(vs) == 1, f"one_{u}"
        # bits in units of "average bits x 1": divide by total size so the row is O(bits)
        self.wcon = prob.addConstraint(
            pulp.lpSum(units.wbits[u, s] / total * v for (u, s), v in self.x.items())
            <= wbudget, "wbits")
        if abudget is not None:
            prob += (pulp.lpSum(units.abits[u, s] / total * v for (u, s), v in self.x.items())
                     <= abudget), "abits"
        items = self.x.items()
        self.l_expr = pulp.lpSum(units.loss[u, s] / self.l_scale * v for (u, s), v in items)
        self.t_expr = pulp.lpSum(units.time[u, s] / self.t_scale * v for (u, s), v in items)
        big = float(len(by_unit)) + 1.0
        self.tcon = prob.addConstraint(self.t_expr <= big, "tau")
        self.lcon = prob.addConstraint(self.l_expr <= big, "lcap")
        self.big = big
        self.prob = prob
        self.wbudget = wbudget

    def solve(self, minimise: str, *, tau: float | None = None, lcap: float | None = None,
              gap: float = 0.0, start: np.ndarray | None = None):
        """Min L or T under optional caps (in µs / loss units). None if infeasible.

        ``start``: a feasible assignment to warm-start from; ``gap``: relative optimality gap.
        """
        u = self.units
        warm = start is not None
        key = (gap, warm)
        if key not in self._solvers:
            self._solvers[key] = make_solver(self.solver_name, gap=gap, warm=warm,
                                             time_limit=self.time_limit)
        solver = self._solvers[key]
        if warm:
            for (i, j), v in self.x.items():
                v.varValue = 1.0 if start[i] == j else 0.0
        t_rhs = self.big if tau is None else (tau - u.t0) / self.t_scale
        l_rhs = self.big if lcap is None else lcap / self.l_scale
        self.tcon.changeRHS(t_rhs)
        self.lcon.changeRHS(l_rhs)
        if minimise is not None:  # None: keep the objective set by the caller
            self.prob.setObjective(self.l_expr if minimise == "L" else self.t_expr)
        for _ in range(3):
            t = _time.perf_counter()
            with _quiet_stdout():
                stats = self.prob.solve(solver)
            self.solves += 1
            self.log.append((minimise, tau, _time.perf_counter() - t, stats.status_str))
            optimal = stats.status == pulp.constants.LpSolveStatus.Optimal
            if not optimal and stats.has_solution and (gap > 0 or self.time_limit):
                # CBC says "GapLimit"; a time limit leaves an unproven incumbent
                self.proven = self.proven and gap > 0
            elif not optimal:
                return None
            choice = self._choice()
            if choice is None:
                raise RuntimeError(f"{self.solver_name} reported an optimum that is not "
                                   "a valid assignment; try the other --solver")
            ev = u.evaluate(choice)
            # Solvers accept rows violated by ~1e-7; the budget must hold exactly as defined.
            over = ev["wbits"] - self.wbudget
            if over <= 1e-12:
                break
            self.wcon.changeRHS(self.wcon.getUb() - over - 1e-12)
        else:
            raise RuntimeError("solver kept returning assignments over the bit budget")
        self.wcon.changeRHS(self.wbudget)
        return choice, ev

    def solve_weighted(self, w_l: float, w_t: float, *, start: np.ndarray | None = None):
        """Min ``w_l L + w_t T`` (normalised units), no caps."""
        self.prob.setObjective(w_l * self.l_expr + w_t * self.t_expr)
        return self.solve(None, start=start)

    def _choice(self) -> np.ndarray | None:
        n_units = self.units.loss.shape[0]
        best = np.full(n_units, -1)
        val = np.full(n_units, -np.inf)
        for (u, s), v in self.x.items():
            x = v.varValue if v.varValue is not None else 0.0
            if x > val[u]:
                best[u], val[u] = s, x
        return best if (val > 0.5).all() else None


def check_budget(units: Units, wbudget: float, abudget: float | None) -> None:
    """Raise `BudgetError` naming the smallest feasible budget if a cheap test shows none exists."""
    min_w = units.min_avg_wbits()
    if min_w > wbudget + 1e-12:
        raise BudgetError(f"--wbits {wbudget:g} is infeasible: the smallest feasible budget is "
                          f"--wbits {ceil_bits(min_w)}", min_wbits=min_w)
    if abudget is not None:
        min_a = units.min_avg_abits()
        if min_a > abudget + 1e-12:
            raise BudgetError(f"--abits {abudget:g} is infeasible: the smallest feasible "
                              f"activation budget is --abits {ceil_bits(min_a)}", min_abits=min_a)


def min_wbits_under_abits(units: Units, abudget: float, solver: str = "highs") -> float:
    """Smallest average weight bits of any assignment meeting the activation budget."""
    cheap = Units(loss=units.wbits, time=np.where(units.available, 0.0, np.nan),
                  wbits=units.wbits, abits=units.abits, size=units.size)
    model = _Model(cheap, wbudget=1e9, abudget=abudget, solver=solver)
    res = model.solve("L")
    if res is None:
        return math.inf
    return res[1]["wbits"]


def solve_tradeoff(units: Units, *, wbudget: float, abudget: float | None = None, r: float = 1.0,
                   grid: int = 4, grid_gap: float = 1e-4, solver: str = "highs",
                   rel_res: float = 1e-9, f_tol: float = 0.0, tangent_steps: int = 4,
                   max_solves: int = 200, time_limit: float | None = None,
                   t_gap: float = 0.0) -> Solution:
    """Minimise ``r log L + (1 - r) log T`` under the bit budgets (see the module docstring).

    ``t_gap``: relative gap of the min-T solve (many schemes tie in time, so proving the fastest
    assignment optimal can be slow; its T only bounds where the search stops).
    ``time_limit``: seconds per MILP (None = none); a MILP stopped by it makes ``exact`` False.
    ``f_tol``: stop the exact search once nothing can beat the incumbent by more than this in
    ``f`` (0 = exact; 1e-4 = within 0.01% of the optimal ``L^r T^(1-r)``).
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r: must be in [0, 1], got {r}")
    if grid < 0:
        raise ValueError(f"grid: must be >= 0, got {grid}")
    start = _time.perf_counter()
    check_budget(units, wbudget, abudget)
    model = _Model(units, wbudget, abudget, solver, time_limit)
    found: list[Point] = []

    def record(res, kind, tau):
        choice, ev = res
        p = Point(L=ev["L"], T=ev["T"], wbits=ev["wbits"], abits=ev["abits"], choice=choice,
                  kind=kind, tau=tau)
        found.append(p)
        return p

    def incumbent(tau):  # the best known point that is feasible under T <= tau (a warm start)
        ok = [p for p in found if p.T <= tau]
        return min(ok, key=lambda p: p.L).choice if ok else None

    first = model.solve("L")
    if first is None:
        if abudget is None:  # check_budget passed, so the MILP is feasible
            raise RuntimeError(f"{solver} found no solution to a feasible problem")
        need = min_wbits_under_abits(units, abudget, solver)
        raise BudgetError(f"--wbits {wbudget:g} with --abits {abudget:g} is infeasible: with this "
                          f"activation budget the smallest feasible budget is --wbits "
                          f"{ceil_bits(need)}", min_wbits=need)
    # 1. endpoints. The L-optimum: ties in L are left to the solver (T does not count at r = 1).
    # The T-optimum is lexicographic (min L among the fastest), a cheap solve under a tight cap.
    l_opt = record(first, "l_opt", None)
    t_first = model.solve("T", gap=t_gap)
    second = model.solve("L", tau=t_first[1]["T"] * (1 + 1e-12), start=t_first[0])
    if second is None or second[1]["T"] > t_first[1]["T"] * (1 + 1e-12):
        second = t_first  # the cap row is only as tight as the solver's tolerance
    t_opt = record(second, "t_opt", None)
    t_lo, t_hi = t_opt.T, l_opt.T
    # T resolution: above the solvers' row tolerance (1e-7, normalised), so a probe at
    # tau - res never returns the previous point again
    res = max(rel_res * (t_hi - t_lo), 1e-6 * model.t_scale)
    # 2. display grid, ascending τ, each warm-started from the last (gap grid_gap: for the plot)
    shown = [t_opt]
    if t_hi - t_lo > res:
        for i in range(1, grid + 1):
            tau = t_lo + (t_hi - t_lo) * i / (grid + 1)
            out = model.solve("L", tau=tau, gap=grid_gap, start=incumbent(tau))
            # a probe that fails (time limit without a solution) repeats the last point, which
            # is feasible for any larger τ: every grid has grid + 2 entries
            shown.append(shown[-1] if out is None else record(out, "grid", tau))
    else:
        shown += [t_opt] * grid
    shown.append(l_opt)
    exact = True
    if 0.0 < r < 1.0 and t_hi - t_lo > res:
        # 2b. tangent steps: f is concave in (L, T), so the minimiser of its linearisation at the
        # incumbent, r L / L* + (1 - r) T / T*, is never worse; a few of these give the search
        # below a near-optimal incumbent (and so a tight t*) before its first probe
        for _ in range(tangent_steps):
            inc = min(found, key=lambda p: p.f(r))
            w_l = r / max(inc.L, _TINY) * model.l_scale
            w_t = (1 - r) / max(inc.T, _TINY) * model.t_scale
            out = model.solve_weighted(w_l, w_t, start=inc.choice)
            if out is None:
                break
            c = record(out, "tangent", None)
            if c.f(r) >= inc.f(r) - 1e-15:
                break
    # 3. exact search for the product objective: walk the frontier from the L-optimum towards
    # smaller T, jumping straight to the largest T that could still beat the incumbent f*.
    if 0.0 < r < 1.0 and t_hi - t_lo > res:
        best = min(p.f(r) for p in found)
        hi, lb = t_hi, l_opt.L  # unexplored: t_lo < T < hi, and there L >= lb
        while True:
            t_star = math.exp((best - f_tol - r * math.log(max(lb, _TINY))) / (1 - r))
            tau = min(hi, t_star) - res
            if tau <= t_lo:
                break
            if model.solves >= max_solves:
                exact = False
                break
            out = model.solve("L", tau=tau, start=incumbent(tau))
            if out is None:
                break
            c = record(out, "search", tau)
            best = min(best, c.f(r))
            # T in (T_c, tau] is dominated by c; below T_c every point has L >= L_c
            hi, lb = min(c.T, tau), c.L
    if r == 1.0:
        chosen = l_opt
    elif r == 0.0:
        chosen = t_opt
    else:
        chosen = min(found, key=lambda p: (p.f(r), p.T))
    distinct = {}
    for p in found:
        distinct.setdefault((round(p.L, 12), round(p.T, 9)), p)
    return Solution(chosen=chosen, points=sorted(distinct.values(), key=lambda p: p.T),
                    grid=shown, r=r, solves=model.solves,
                    seconds=_time.perf_counter() - start, exact=exact and model.proven,
                    log=model.log)
