"""The allocation MILP and its exact loss/time trade-off: pure math, no model or file knowledge.

A problem is a set of *units* (one linear block group, or one whole expert), each taking exactly one
scheme ``s``: binary ``x[u, s]``, ``sum_s x[u, s] = 1``. With per-unit, per-scheme loss ``Δ[u, s]``,
time ``c[u, s]`` (µs), storage bits ``w[u, s]`` (bits per weight x elements) and activation bits
``a[u, s]``::

    L = Σ Δ x        T = t0 + Σ c x        Σ w x <= W · Σ size        (Σ a x <= A · Σ size)

MxMoE (paper §4.2) minimises ``L^r · T^(1-r)``, i.e. ``f = r log L + (1 - r) log T``, which is not
linear (the original needs Gurobi's log constraints). Two facts make it linear here:

* every minimiser of ``f`` is Pareto-optimal in (L, T), and the Pareto frontier is what the
  ε-constraint program ``P(τ) = min L s.t. T <= τ`` traces;
* ``f`` is concave in (L, T) (a sum of logs) and increasing in both, so over the finite set of
  assignments its minimum sits at a vertex of the lower-left convex hull of the (L, T) points: a
  *supported* Pareto point, which minimises ``L + λT`` for some λ > 0. A point minimising ``L + λT``
  also solves ``P(τ)`` at its own ``τ = T``, so the hull vertices are exact ε-constraint points.

The search (all MILPs through PuLP; HiGHS in process, or CBC):

1. the L-optimum (min L);
2. a walk left along the hull by weighted sums ``min L + λT``, λ starting at the tangent of f at
   the L-optimum and growing 4x per step, until a bound proves nothing further left can win:
   every vertex left of the current one has ``L >= L_left`` and ``T >= T_lb`` (the LP relaxation's
   min T). If the walk cannot prove it within ``walk`` steps (and always for r = 0), the exact
   min-T MILP fixes the left end. Weighted sums are easy MILPs; a pure min-T is not (many schemes
   run about equally fast), which is why it is the fallback, not the start;
3. dichotomic refinement (Aneja-Nair) between the vertices found: for a segment a-b, solve
   ``min L + λT`` with λ its slope; a solution strictly below a-b is a new vertex and splits it.
   A segment whose corner bound ``r log L_b + (1 - r) log T_a`` cannot beat the best vertex is
   skipped (once ``hull`` vertices are found for the picture);
4. optionally ``grid`` ε-constraint probes ``P(τ)`` at evenly spaced τ (to ``grid_gap``), which
   also show the frontier's non-supported points between hull vertices.

With zero gaps (the default) the result is the exact minimiser of ``f``; the tests check it
against brute force for r = 0, 1 and in between, on random and on realistic instances.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import os
import sys
import time as _time

import numpy as np

# PuLP is imported where a model is built or solved, not here: `Units` and the helpers serve
# problem building and scoring on machines without PuLP (the GPU machine has none).

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
    # [u] device of each unit under expert parallelism, -1: runs on every device (its time is
    # per device); None: one device. T is then t0 + replicated + the busiest device's time.
    device: np.ndarray | None = None

    def __post_init__(self):
        u, s = self.loss.shape
        if self.device is not None and (self.device.shape != (u,) or self.device.max() < 0):
            raise ValueError(f"device: expected [{u}] device indices (some >= 0), got "
                             f"{self.device}")
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

    def layer_time(self, unit_time: np.ndarray) -> float:
        """T of per-unit times ``[u]``: ``t0`` plus their sum, or with ``device``, plus the
        replicated units' sum and the busiest device's (the devices run in parallel)."""
        if self.device is None:
            return float(self.t0 + unit_time.sum())
        replicated = unit_time[self.device < 0].sum()
        return float(self.t0 + replicated + self.device_times(unit_time).max())

    def device_times(self, unit_time: np.ndarray) -> np.ndarray:
        """``[N]`` µs of the placed units on each device (``device`` set)."""
        return np.bincount(self.device[self.device >= 0], unit_time[self.device >= 0],
                           minlength=int(self.device.max()) + 1)

    def evaluate(self, choice: np.ndarray) -> dict:
        """L, T and average bits of an assignment (``choice[u]`` = scheme index)."""
        idx = np.arange(len(choice))
        total = float(self.size.sum())
        return dict(L=float(self.loss[idx, choice].sum()),
                    T=self.layer_time(self.time[idx, choice]),
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
    kind: str  # "l_opt", "t_opt", "hull" (a weighted-sum solve) or "grid" (ε-constraint)
    tau: float | None  # the T cap it was solved under (None for the endpoints' own solves)

    def f(self, r: float) -> float:
        return objective(self.L, self.T, r)


@dataclasses.dataclass(frozen=True, slots=True)
class Solution:
    chosen: Point  # minimiser of r log L + (1 - r) log T among the points found
    points: list[Point]  # every distinct point found, sorted by T
    grid: list[Point]  # the ε-constraint display grid, endpoints included, by increasing τ
    hull: list[Point]  # vertices of the frontier's lower convex hull found, by increasing T
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
    import pulp
    if name == "highs":
        # No warm start: with PuLP 4.2 + highspy 1.16, a warm-started MILP came back "Optimal"
        # at the start point itself (checked: min T returned the min-L point's T).
        return pulp.HiGHS(msg=False, gapRel=gap, gapAbs=1e-12 if gap == 0 else None,
                          threads=threads, timeLimit=time_limit, output_flag=False)
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
        import pulp
        self.units = units
        self.solver_name = solver
        self.time_limit = time_limit
        self._solvers = {}
        self.solves = 0
        self.log: list[tuple] = []  # (objective, tau, seconds, status) per MILP
        self.proven = True  # False once a solve stopped at its time limit
        ok = units.available
        # Normalise loss and time so both objectives are O(1) per unit (solver tolerances are
        # absolute); the caps use the same scale. The loss by its median positive entry, not its
        # maximum: squared losses span ~1e8 (a w2 block vs a w8 one), and scaled by the maximum
        # the small ones fall below the solver's optimality tolerance (1e-7) and stop counting.
        pos = units.loss[ok & (units.loss > 0)]
        self.l_scale = float(np.median(pos)) if pos.size else 1.0
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
        if units.device is None:
            self.t_expr = pulp.lpSum(units.time[u, s] / self.t_scale * v for (u, s), v in items)
        else:  # T = replicated units + the busiest device: z >= every device's sum
            dev = units.device
            z = prob.add_variable("busiest_device", lowBound=0)
            for d in range(int(dev.max()) + 1):
                prob += z >= pulp.lpSum(units.time[u, s] / self.t_scale * v
                                        for (u, s), v in items if dev[u] == d), f"device_{d}"
            self.t_expr = z + pulp.lpSum(units.time[u, s] / self.t_scale * v
                                         for (u, s), v in items if dev[u] < 0)
        # a cap no assignment reaches: every unit at its costliest scheme (loss and time scaled)
        worst = np.where(ok, units.loss / self.l_scale, 0.0).max(axis=1).sum()
        big = float(max(worst, len(by_unit))) + 1.0
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
        import pulp
        u = self.units
        warm = False  # see make_solver: warm starts are off; `start` is accepted and ignored
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
        tighten = 0.0
        for _ in range(6):
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
            # the row holds only to the solver's tolerance (~1e-7 bits): tighten it a little
            # more each time until the rounded assignment meets the budget exactly
            tighten = 2 * max(tighten, over, 1e-9)
            self.wcon.changeRHS(self.wbudget - tighten)
        else:
            raise RuntimeError("solver kept returning assignments over the bit budget")
        self.wcon.changeRHS(self.wbudget)
        return choice, ev

    def lp_min_t(self) -> float:
        """A lower bound on T: min T of the LP relaxation (budgets kept, x continuous)."""
        import pulp
        self.prob.setObjective(self.t_expr)
        self.tcon.changeRHS(self.big)
        self.lcon.changeRHS(self.big)
        with _quiet_stdout():
            stats = self.prob.solve(pulp.HiGHS(msg=False, mip=False, output_flag=False))
        self.log.append(("T (LP)", None, 0.0, stats.status_str))
        if stats.status != pulp.constants.LpSolveStatus.Optimal:
            return self.units.layer_time(np.where(self.units.available, self.units.time,
                                                  np.inf).min(axis=1))
        return self.units.t0 + float(pulp.value(self.t_expr)) * self.t_scale - 1e-9

    def solve_weighted(self, w_l: float, w_t: float, *, start: np.ndarray | None = None,
                       gap: float = 0.0):
        """Min ``w_l L + w_t T`` (normalised units), no caps."""
        self.prob.setObjective(w_l * self.l_expr + w_t * self.t_expr)
        return self.solve(None, start=start, gap=gap)

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
                   hull: int = 6, walk: int = 8, grid: int = 0, grid_gap: float = 1e-2,
                   solver: str = "highs",
                   f_tol: float = 0.0, t_gap: float = 0.0, max_solves: int = 200,
                   time_limit: float | None = None) -> Solution:
    """Minimise ``r log L + (1 - r) log T`` under the bit budgets (see the module docstring).

    ``hull``: supported frontier points to find beyond the endpoints even where the product
    search does not need them (the picture). ``grid``: ε-constraint display probes, solved to
    ``grid_gap``. ``f_tol``: the search may stop once nothing can beat the incumbent by more than
    this in ``f`` (0 = exact). ``t_gap``: relative gap of the min-T endpoint. ``time_limit``:
    seconds per MILP (None = none); a MILP stopped by it, or running out of ``max_solves`` with
    unexplored hull segments, makes ``exact`` False.
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r: must be in [0, 1], got {r}")
    if grid < 0 or hull < 0:
        raise ValueError(f"grid, hull: must be >= 0, got {grid}, {hull}")
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

    first = model.solve("L")
    if first is None:
        if abudget is None:  # check_budget passed, so the MILP is feasible
            raise RuntimeError(f"{solver} found no solution to a feasible problem")
        need = min_wbits_under_abits(units, abudget, solver)
        raise BudgetError(f"--wbits {wbudget:g} with --abits {abudget:g} is infeasible: with this "
                          f"activation budget the smallest feasible budget is --wbits "
                          f"{ceil_bits(need)}", min_wbits=need)
    # 1. the L-optimum; the T end comes from the walk below (a pure min-T MILP is the slow one:
    # many schemes run about equally fast, and HiGHS can take minutes to prove it).
    l_opt = record(first, "l_opt", None)
    exact = True
    product = 0.0 < r < 1.0
    best = min(p.f(r) for p in found)
    vertices = [l_opt]
    heap: list = []
    seq = 0

    def push(a: Point, b: Point):
        nonlocal seq
        if b.T - a.T <= 1e-9 * max(b.T, 1.0) or a.L - b.L <= 1e-12 * max(a.L, 1e-300):
            return
        heapq.heappush(heap, (objective(b.L, a.T, r) if product else 0.0, seq, a, b))
        seq += 1

    def weighted(lam: float, start: np.ndarray):  # min L + lam T: a hull vertex (or on an edge)
        scale = model.l_scale + lam * model.t_scale
        return model.solve_weighted(model.l_scale / scale, lam * model.t_scale / scale,
                                    start=start)

    # 2. walk left along the hull from the L-optimum by weighted sums min L + λT, λ x4 per step,
    # starting from the tangent of f at the L-optimum (r = 1 walks only to draw the frontier).
    # Every vertex left of `left` has L >= L_left and T >= T_lb (the LP bound of min T), so once
    # r log L_left + (1 - r) log T_lb cannot beat f*, nothing further left can.
    rr = r if product else 0.5
    lam = (1 - rr) / rr * max(l_opt.L, _TINY) / max(l_opt.T, _TINY)
    left = l_opt
    t_lb = None
    for _ in range(walk if r > 0 else 0):
        if product:
            if t_lb is None:
                t_lb = model.lp_min_t()
            if objective(left.L, t_lb, r) >= best - f_tol:
                break
        elif len(vertices) >= hull + 2:
            break
        out = weighted(lam, left.choice)
        lam *= 4
        if out is None:
            continue
        c = record(out, "hull", None)
        if c.T < left.T * (1 - 1e-12) and c.L > left.L:
            vertices.append(c)
            best = min(best, c.f(r))
            push(c, left)
            left = c
    else:
        # not certified within `walk` steps (or r = 0): the exact min T decides the left end
        if r < 1.0:
            out = model.solve("T", gap=t_gap, start=left.choice)
            if out is not None:
                c = record(out, "t_min", None)
                if c.T < left.T * (1 - 1e-12):
                    vertices.append(c)
                    best = min(best, c.f(r))
                    push(c, left)
                    left = c
    t_opt = left if r > 0 else min(found, key=lambda p: (p.T, p.L))
    # 3. refine the hull between the vertices found, dichotomically (Aneja-Nair): for a segment
    # a-b, min L + λT with λ its slope; a solution strictly below a-b is a new vertex and splits
    # it. Segments whose corner bound cannot beat f* are skipped once the picture has `hull`
    # vertices.
    while heap:
        bound, _, a, b = heapq.heappop(heap)
        needed = product and bound < best - f_tol
        if not needed and len(vertices) >= hull + 2:
            continue
        if model.solves >= max_solves:
            exact = exact and not needed
            continue
        lam = (a.L - b.L) / (b.T - a.T)  # the slope of segment a-b
        out = weighted(lam, (a if a.L + lam * a.T <= b.L + lam * b.T else b).choice)
        if out is None:
            continue
        c = record(out, "hull", None)
        line = a.L + lam * a.T
        if c.L + lam * c.T < line - 1e-9 * max(abs(line), 1e-300):  # strictly below: a vertex
            vertices.append(c)
            best = min(best, c.f(r))
            push(a, c)
            push(c, b)
    # 3. optional ε-constraint probes on an even τ grid: the non-supported frontier, for show
    t_lo, t_hi = t_opt.T, l_opt.T
    shown = [t_opt]
    for i in range(1, grid + 1):
        tau = t_lo + (t_hi - t_lo) * i / (grid + 1)
        ok = [p for p in found if p.T <= tau]
        warm = min(ok, key=lambda p: p.L).choice if ok else None
        out = model.solve("L", tau=tau, gap=grid_gap, start=warm) if t_hi > t_lo else None
        shown.append(shown[-1] if out is None else record(out, "grid", tau))
    shown.append(l_opt)
    if r == 1.0:
        chosen = min(found, key=lambda p: (p.L, p.T))
    elif r == 0.0:
        chosen = min(found, key=lambda p: (p.T, p.L))
    else:
        chosen = min(found, key=lambda p: (p.f(r), p.T))
    distinct = {}
    for p in found:
        distinct.setdefault((round(p.L, 12), round(p.T, 9)), p)
    return Solution(chosen=chosen, points=sorted(distinct.values(), key=lambda p: p.T),
                    grid=shown, hull=sorted(vertices, key=lambda p: p.T), r=r,
                    solves=model.solves,
                    seconds=_time.perf_counter() - start,
                    exact=exact and model.proven and (t_gap == 0 or r == 1.0),
                    log=model.log)
