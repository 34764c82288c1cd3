"""Predicted device time of a mixed-precision MoE layer from a perf table, and Zipf routing.

``layer_us(perf, shape, gate_up, down, group_sizes)``: the routed experts' gate_up (SiLU·up in
the epilogue) and down, each ONE launch of the mixed kernel (``kernels.pallas.mixed_launch``), with
expert ``e`` in scheme ``gate_up[e]`` / ``down[e]`` over ``group_sizes[e]`` rows, and the shared
expert (``shared=(gate_up scheme, down scheme)``) as one more group of the same launches over all
tokens::

    time = sum over the two GEMMs of  launch_us + sum_e share(scheme_e, m_e)

where ``share`` is ``PerfModel.share_us``: an expert's share of a launch measured with the
model's expert count at that load (``perf.profile``), so experts sharing the SMs are counted as
shares of one launch and not as one launch each. It is the solver's objective too (linear in the
allocation: ``alloc.problem``'s time per expert and ``t0``). With an analytic table (one GEMM
alone per point) the shares are serial times and the sum is the serial roofline.

``zipf_group_sizes(tokens, e, top_k, seed)``: rows per expert of Zipf-like routing, the load the
benchmarks and the predictor's validation use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mxmoe_jax.perf.model import PerfModel
from mxmoe_jax.perf.shapes import MoEShapes
from mxmoe_jax.quant.scheme import QScheme


def zipf_group_sizes(tokens: int, e: int, top_k: int, seed: int = 0, alpha: float = 1.2):
    """Tokens per expert ``[e]`` int32 for ``tokens`` tokens routed top-k over a Zipf-like expert
    popularity (``rank^-alpha`` over a random permutation; Gumbel top-k, no repeats)."""
    rng = np.random.default_rng(seed)
    p = 1.0 / (1.0 + rng.permutation(e)) ** alpha
    g = rng.gumbel(size=(tokens, e)) + np.log(p)[None, :]
    chosen = np.argpartition(-g, top_k - 1, axis=1)[:, :top_k]
    return np.bincount(chosen.ravel(), minlength=e).astype(np.int32)


def layer_us(perf: PerfModel, shape: MoEShapes, gate_up: Sequence[str], down: Sequence[str],
             group_sizes, *, shared: tuple[str, str] | None = None,
             tokens: int | None = None) -> float:
    """Predicted µs of the layer's expert GEMMs (see the module docstring). ``tokens`` (the
    shared expert's rows) defaults to ``sum(group_sizes) / top_k``."""
    gs = np.asarray(group_sizes)
    e = shape.num_experts
    if gs.shape != (e,) or len(gate_up) != e or len(down) != e:
        raise ValueError(f"group_sizes, gate_up, down: need {e} entries each (the shape's "
                         f"experts), got {gs.shape}, {len(gate_up)}, {len(down)}")
    if (gs < 0).any():
        raise ValueError("group_sizes: must be >= 0")
    d, i = shape.hidden, shape.moe_inter

    def share(s, m, n, k):  # each block runs what its scheme is at its K (QScheme.for_k)
        return perf.share_us(QScheme.parse(s).for_k(k), m, n, k)

    total = 2 * perf.launch_us
    for ex in range(e):
        total += share(gate_up[ex], gs[ex], 2 * i, d) + share(down[ex], gs[ex], d, i)
    if shared is not None:
        if not shape.shared_inter:
            raise ValueError(f"shared: {shape.name} has no shared expert")
        t = gs.sum() / shape.top_k if tokens is None else tokens
        si = shape.shared_inter
        total += share(shared[0], t, 2 * si, d) + share(shared[1], t, d, si)
    return float(total)
