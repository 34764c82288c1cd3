"""`solve_allocation`: the MILP over a whole model, per layer or at once, with its summary.

Layer mode solves one MILP per MoE layer with the budget per layer (the original's default);
model mode solves one MILP with one budget for all layers (the original's crashing mode, working).
The product objective ``L^r T^(1-r)`` is applied per MILP (per layer in layer mode, as the paper
decomposes it).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import multiprocessing

import numpy as np

from mxmoe_jax.alloc.milp import BudgetError, Solution, Units, ceil_bits, solve_tradeoff
from mxmoe_jax.alloc.problem import PROXIES, AllocInputs, decode, make_units, uniform_choice
from mxmoe_jax.alloc.qconfig import make_qconfig, quantizer_record

MODES = ("layer", "model")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SolveConfig:
    """What `solve` optimises and how hard it tries."""

    wbits: float  # average weight-bit budget (scales and offsets included)
    abits: float | None = None  # average activation-bit budget; None = no limit
    r: float = 0.75  # weight of log L against log T (1 = accuracy only, 0 = speed only)
    mode: str = "layer"  # "layer": a budget per layer; "model": one budget for the model
    granularity: str = "linear"  # "linear": per block group; "expert": one scheme per expert
    proxy: str = "squared"  # the loss of a block from its Δ: "squared" (Δ²) or "frobenius" (Δ)
    hull: int = 4  # convex-hull frontier points to find per MILP for the picture
    grid: int = 0  # ε-constraint display probes at evenly spaced τ (slower MILPs)
    grid_gap: float = 1e-2  # relative MILP gap of those probes (pictures, not proofs)
    f_tol: float = 0.0  # the product search may stop within this of the optimal log objective
    t_gap: float = 0.0  # relative gap of the min-T endpoint
    time_limit: float | None = 20.0  # seconds per MILP (None: unlimited)
    max_solves: int = 60  # MILPs per layer (or model)
    solver: str = "highs"  # "highs" (in process) or "cbc" (bundled with pulp[cbc])
    jobs: int = 1  # processes solving layers in parallel (layer mode; spawned)
    devices: int = 1  # expert parallelism: T = the busiest of N devices (contiguous placement)

    def __post_init__(self):
        if not self.wbits > 0:
            raise ValueError(f"wbits: must be positive, got {self.wbits}")
        if self.abits is not None and not self.abits > 0:
            raise ValueError(f"abits: must be positive, got {self.abits}")
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"r: must be in [0, 1], got {self.r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {MODES}")
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy: {self.proxy!r} is not one of {PROXIES}")
        if self.granularity not in ("linear", "expert"):
            raise ValueError(f"granularity: {self.granularity!r} is not 'linear' or 'expert'")
        if self.jobs < 1:
            raise ValueError(f"jobs: must be >= 1, got {self.jobs}")
        if self.devices < 1:
            raise ValueError(f"devices: must be >= 1, got {self.devices}")
        if self.devices > 1 and self.mode != "layer":
            raise ValueError("devices: expert-parallel balancing needs mode 'layer'")
        for f in ("grid_gap", "f_tol", "t_gap"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f}: must be >= 0")

    @classmethod
    def exact(cls, **kw) -> SolveConfig:
        """Zero gaps and no time limit: slow on big layers, exact everywhere."""
        kw.update(grid_gap=0.0, f_tol=0.0, t_gap=0.0, time_limit=None, max_solves=100_000)
        return cls(**kw)


@dataclasses.dataclass(frozen=True, slots=True)
class AllocResult:
    qconfig: dict  # the qconfig.json dict
    solutions: dict[str, Solution]  # per layer ("model" in model mode)
    units: dict[str, Units]  # the MILP units behind each solution
    uniform: dict[str, dict | None]  # per scheme: L, T_us, wbits, abits of the uniform assignment
    totals: dict  # the mixed assignment: L, T_us, wbits, abits


def _summed(evals: list[dict], sizes: list[float]) -> dict:
    total = sum(sizes)
    return dict(L=sum(e["L"] for e in evals), T_us=sum(e["T"] for e in evals),
                wbits=sum(e["wbits"] * s for e, s in zip(evals, sizes, strict=True)) / total,
                abits=sum(e["abits"] * s for e, s in zip(evals, sizes, strict=True)) / total)


def check_layer_budgets(units: dict[str, Units], cfg: SolveConfig) -> None:
    """Layer mode: every layer must meet the budget alone; name the smallest that makes all do."""
    worst_w = max(units.items(), key=lambda kv: kv[1].min_avg_wbits())
    need_w = worst_w[1].min_avg_wbits()
    if need_w > cfg.wbits + 1e-12:
        raise BudgetError(f"--wbits {cfg.wbits:g} is infeasible: the smallest feasible budget is "
                          f"--wbits {ceil_bits(need_w)} (set by layer {worst_w[0]}; per layer, "
                          "the cheapest scheme of every block)", min_wbits=need_w)
    if cfg.abits is not None:
        worst_a = max(units.items(), key=lambda kv: kv[1].min_avg_abits())
        need_a = worst_a[1].min_avg_abits()
        if need_a > cfg.abits + 1e-12:
            raise BudgetError(f"--abits {cfg.abits:g} is infeasible: the smallest feasible "
                              f"activation budget is --abits {ceil_bits(need_a)} (set by layer "
                              f"{worst_a[0]})", min_abits=need_a)


def solve_allocation(inputs: AllocInputs, cfg: SolveConfig, *, progress: bool = True,
                     meta: dict | None = None) -> AllocResult:
    """Solve every layer (or the model), decode the assignment and compare with uniform schemes."""
    from tqdm.auto import tqdm

    gran = cfg.granularity
    if cfg.mode == "layer":
        groups = {ld.layer: [ld] for ld in inputs.layers}
    else:
        groups = {"model": list(inputs.layers)}
    par = dict(devices=cfg.devices,
               shared=bool(inputs.trace_meta.get("num_shared_experts", 0) or 0))
    units = {key: make_units(lds, gran, cfg.proxy, **par) for key, lds in groups.items()}
    if cfg.mode == "layer":
        check_layer_budgets(units, cfg)
    kw = dict(wbudget=cfg.wbits, abudget=cfg.abits, r=cfg.r, hull=cfg.hull, grid=cfg.grid,
              grid_gap=cfg.grid_gap, solver=cfg.solver, f_tol=cfg.f_tol, t_gap=cfg.t_gap,
              time_limit=cfg.time_limit, max_solves=cfg.max_solves)
    solutions: dict[str, Solution] = {}
    bar = tqdm(total=len(groups), desc=f"solve ({cfg.mode} mode, r={cfg.r:g})", unit="layer",
               disable=not progress, leave=False)
    jobs = min(cfg.jobs, len(groups))
    if jobs > 1:
        # layers are independent MILPs: one process each (spawned, so no fork of a threaded
        # parent; HiGHS runs single-threaded in each)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {pool.submit(solve_tradeoff, units[key], **kw): key for key in groups}
            for fut in concurrent.futures.as_completed(futures):
                solutions[futures[fut]] = fut.result()
                bar.update()
                bar.set_postfix(MILPs=sum(s.solves for s in solutions.values()))
        solutions = {key: solutions[key] for key in groups}
    else:
        for key in groups:
            solutions[key] = solve_tradeoff(units[key], **kw)
            bar.update()
            bar.set_postfix(MILPs=sum(s.solves for s in solutions.values()))
    bar.close()

    assignment: dict = {}
    per_layer: dict = {}
    for key, lds in groups.items():
        sol = solutions[key]
        assignment.update(decode(lds, gran, sol.chosen.choice, inputs.schemes))
        if cfg.mode == "layer":
            per_layer[key] = dict(L=sol.chosen.L, T_us=sol.chosen.T, wbits=sol.chosen.wbits,
                                  abits=sol.chosen.abits, exact=sol.exact, MILPs=sol.solves,
                                  seconds=round(sol.seconds, 3))
            if cfg.devices > 1:  # the busiest device sets T; what each one runs
                u = units[key]
                t = u.time[np.arange(len(sol.chosen.choice)), sol.chosen.choice]
                per_layer[key]["device_us"] = [round(float(v), 3) for v in u.device_times(t)]
    sizes = [float(u.size.sum()) for u in units.values()]
    totals = _summed([units[k].evaluate(solutions[k].chosen.choice) for k in units], sizes)
    # uniform assignments at linear granularity (the same blocks, one scheme everywhere)
    lin = {key: make_units(lds, "linear", cfg.proxy, **par) for key, lds in groups.items()}
    uniform: dict[str, dict | None] = {}
    for j, name in enumerate(inputs.schemes):
        choices = {k: uniform_choice(u, j) for k, u in lin.items()}
        if any(c is None for c in choices.values()):
            uniform[name] = None
            continue
        uniform[name] = _summed([lin[k].evaluate(c) for k, c in choices.items()], sizes)
    summary = dict(totals, exact=all(s.exact for s in solutions.values()),
                   MILPs=sum(s.solves for s in solutions.values()),
                   seconds=round(sum(s.seconds for s in solutions.values()), 3),
                   perf=inputs.perf.label, layers=per_layer, uniform=uniform)
    full_meta = dict(wbits=cfg.wbits, abits=cfg.abits, batch=inputs.batch, r=cfg.r, mode=cfg.mode,
                     proxy=cfg.proxy,
                     granularity=gran, schemes=list(inputs.schemes),
                     perf=dict(path=inputs.perf.path, source=inputs.perf.source,
                               device=inputs.perf.device),
                     loss_method=inputs.loss_meta.get("method"),
                     loss_metric=inputs.loss_meta.get("metric"),
                     # the losses are this quantizer's: quantize / eval refuse another one
                     quantizer=quantizer_record(inputs.loss_meta),
                     solver=cfg.solver,
                     model_fingerprint=(inputs.trace_meta.get("model_fingerprint")
                                        or inputs.loss_meta.get("model_fingerprint")),
                     created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    full_meta.update(meta or {})
    q = make_qconfig(assignment, meta=full_meta, summary=summary)
    return AllocResult(qconfig=q, solutions=solutions, units=units, uniform=uniform,
                       totals=totals)


def frontier_rows(result: AllocResult, r: float) -> list[dict]:
    """pareto.csv rows: every point found, per MILP, with the chosen one marked."""
    rows = []
    for key, sol in result.solutions.items():
        for p in sol.points:
            rows.append(dict(layer=key, kind=p.kind, tau_us=p.tau, L=p.L, T_us=p.T,
                             wbits=p.wbits, abits=p.abits, objective=p.f(r),
                             chosen=int(p is sol.chosen or (p.L == sol.chosen.L
                                                             and p.T == sol.chosen.T))))
    return rows


def model_curve(result: AllocResult, n: int = 60) -> np.ndarray:
    """[points, 2] (L, T) of the whole model's supported frontier, from the points found.

    Layers are independent, so the model's minimiser of ``L + λT`` is every layer's own: sweep λ
    over the slopes seen and sum, per layer, the found point minimising ``L + λT``.
    """
    sols = list(result.solutions.values())
    slopes = []
    for sol in sols:
        h = sol.hull
        slopes += [(a.L - b.L) / (b.T - a.T) for a, b in zip(h, h[1:], strict=False)
                   if b.T > a.T and a.L > b.L]
    if not slopes:
        slopes = [1.0]
    lams = np.geomspace(min(slopes) / 10, max(slopes) * 10, n)
    out = []
    for lam in lams:
        picks = [min(sol.points, key=lambda p, lam=lam: p.L + lam * p.T) for sol in sols]
        out.append((sum(p.L for p in picks), sum(p.T for p in picks)))
    return np.unique(np.array(out), axis=0)
