"""Bit allocation: the MxMoE MILP (PuLP), its exact loss/time trade-off, and qconfig.json.

``milp`` is the pure math; ``problem`` turns trace.json + loss.json + perf.json into MILP units;
``solve`` runs it per layer or per model; ``qconfig`` reads and writes the result (ours and the
original MxMoE schema); ``report`` prints and plots it; ``cli`` is ``mxmoe-jax solve``.
"""

from mxmoe_jax.alloc.milp import BudgetError, Solution, Units, objective, solve_tradeoff
from mxmoe_jax.alloc.problem import AllocInputs, build_inputs, load_inputs, make_units
from mxmoe_jax.alloc.qconfig import from_original, load_qconfig, to_original, validate_qconfig
from mxmoe_jax.alloc.solve import AllocResult, SolveConfig, solve_allocation

__all__ = [
    "AllocInputs", "AllocResult", "BudgetError", "Solution", "SolveConfig", "Units",
    "build_inputs", "from_original", "load_inputs", "load_qconfig", "make_units", "objective",
    "solve_allocation", "solve_tradeoff", "to_original", "validate_qconfig",
]
