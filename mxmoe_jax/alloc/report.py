"""What `solve` shows: the summary table, pareto.csv, the frontier plot and the scheme heatmap.

Every table and plot names the perf table's source (analytic or measured) and device, since the
predicted times are only as good as that table.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from mxmoe_jax.alloc.solve import AllocResult, frontier_rows, model_curve

_CSV_FIELDS = ("layer", "kind", "tau_us", "L", "T_us", "wbits", "abits", "objective", "chosen")


def summary_table(result: AllocResult) -> str:
    """Mixed vs every uniform scheme: bits, predicted time and loss (ratios against mixed)."""
    q = result.qconfig
    s, meta = q["summary"], q["meta"]
    mixed = result.totals
    lines = [f"allocation: --wbits {meta['wbits']:g}"
             + (f" --abits {meta['abits']:g}" if meta["abits"] is not None else "")
             + f", r={meta['r']:g}, {meta['mode']} mode, {meta['granularity']} granularity, "
             f"batch {meta['batch']} tokens; times from the {s['perf']}"]
    head = f"{'assignment':<22}{'W bits':>8}{'A bits':>8}{'T (µs)':>11}{'T/mixed':>9}" \
           f"{'L':>13}{'L/mixed':>9}  within budget"
    lines += [head, "-" * len(head)]

    def row(name, v, budget_ok):
        t_ratio = v["T_us"] / mixed["T_us"] if mixed["T_us"] else math.nan
        l_ratio = v["L"] / mixed["L"] if mixed["L"] else (1.0 if v["L"] == 0 else math.inf)
        return (f"{name:<22}{v['wbits']:>8.3f}{v['abits']:>8.2f}{v['T_us']:>11.1f}"
                f"{t_ratio:>9.3f}{v['L']:>13.5g}{l_ratio:>9.3f}  {budget_ok}")

    lines.append(row("mixed (solver)", mixed, "yes"))
    for name, v in result.uniform.items():
        if v is None:
            lines.append(f"{name:<22}  n/a (its group_size does not divide some K, or no loss)")
            continue
        ok = v["wbits"] <= meta["wbits"] + 1e-9 and (
            meta["abits"] is None or v["abits"] <= meta["abits"] + 1e-9)
        lines.append(row(name, v, "yes" if ok else "no"))
    exact = "exact" if s["exact"] else "not proven optimal everywhere (a time limit or gap hit)"
    lines.append(f"{s['MILPs']} MILPs in {s['seconds']:.1f} s; {exact}")
    return "\n".join(lines)


def write_pareto_csv(result: AllocResult, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        w.writeheader()
        for row in frontier_rows(result, result.qconfig["meta"]["r"]):
            w.writerow({k: ("" if row[k] is None else row[k]) for k in _CSV_FIELDS})
    tmp.replace(path)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(result: AllocResult, path: str | Path) -> Path:
    """L against predicted T: the frontier (model sum of the per-layer grids), the chosen point and
    the uniform schemes."""
    plt = _plt()
    q = result.qconfig
    fig, ax = plt.subplots(figsize=(7, 5))
    curve = model_curve(result)
    order = np.argsort(curve[:, 1])
    ax.plot(curve[order, 1], curve[order, 0], "o-", color="tab:blue", ms=4,
            label="Pareto frontier (supported points, model total)")
    if len(result.solutions) == 1:  # model mode: every point found, ε-constraint probes too
        sol = next(iter(result.solutions.values()))
        ax.plot([p.T for p in sol.points], [p.L for p in sol.points], ".", color="tab:blue",
                alpha=0.5, label="frontier points found")
    ax.plot([result.totals["T_us"]], [result.totals["L"]], "*", color="tab:red", ms=16,
            label=f"chosen (r={q['meta']['r']:g}): {result.totals['wbits']:.3f} W bits")
    floor = curve[:, 0].min() / 100  # a near-lossless uniform point would squash the axis
    for name, v in result.uniform.items():
        if v is None or v["L"] < floor:
            continue
        ax.plot([v["T_us"]], [v["L"]], "s", ms=6, alpha=0.8)
        ax.annotate(f"{name} ({v['wbits']:.2f})", (v["T_us"], v["L"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted time of the MoE layers (µs, {q['summary']['perf']})")
    ax.set_ylabel("quantization loss L = Σ Δ (log)")
    ax.set_title(f"MxMoE allocation, --wbits {q['meta']['wbits']:g}, batch {q['meta']['batch']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_heatmap(result: AllocResult, path: str | Path) -> Path:
    """The chosen scheme per (layer, expert) for gate/up and for down."""
    plt = _plt()
    q = result.qconfig
    schemes = q["meta"]["schemes"]
    layers = list(q["layers"])
    n_e = max(len(v) for v in q["layers"].values())
    grids = {b: np.full((len(layers), n_e), np.nan) for b in ("gate", "down")}
    for i, layer in enumerate(layers):
        for e, blocks in q["layers"][layer].items():
            for b in grids:
                grids[b][i, int(e)] = schemes.index(blocks[b])
    cmap = plt.get_cmap("tab10", len(schemes))
    fig, axes = plt.subplots(1, 2, figsize=(min(4 + n_e * 0.12, 20),
                                            2.5 + len(layers) * 0.25), squeeze=False)
    for ax, (b, g) in zip(axes[0], grids.items(), strict=True):
        im = ax.imshow(g, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(schemes) - 0.5,
                       interpolation="nearest")
        ax.set_title("gate & up" if b == "gate" else "down")
        ax.set_xlabel("expert (last = shared)" if n_e > 1 else "expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
    cbar = fig.colorbar(im, ax=axes[0].tolist(), ticks=range(len(schemes)))
    cbar.ax.set_yticklabels(schemes, fontsize=7)
    fig.text(0.01, 0.99, f"chosen scheme per block, {result.totals['wbits']:.3f} W bits",
             fontsize=9, va="top")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
