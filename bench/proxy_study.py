"""How well does the solver's loss proxy predict perplexity? (issue: allocation beats uniform)

On ``qwen2moe-tiny-books`` with GPTQ: many allocations at a weight-bit budget (uniform, the
solver's under each proxy and budget mode, and random ones at the same budget), each quantized
once (`mxmoe-jax quantize --method gptq`) and evaluated on books-eval; then, per budget, the
Spearman rank correlation between each proxy's predicted loss and the measured perplexity, and the
regret of the allocation each proxy's solver picks (its ppl minus the best measured).

Proxies, all sums over the MILP's units (gate_up = gate + up, down) of one allocation:

* ``frobenius``: Σ Δ, the original MxMoE (``Δ = ||Ô − O||_F`` of the layer output);
* ``squared``: Σ Δ² (squared errors of independent blocks add);
* ``*_fit``: the same weighted per layer by ``α_l``, the perplexity increase of quantizing layer
  ``l`` alone (every block at the lowest scheme) divided by its proxy sum there: a layer's Δ is
  in the units of its own hidden state, which later layers amplify differently. Layer mode is
  invariant to per-layer weights, so ``*_fit`` only changes model mode.

Random allocations: the solver's under ``Δ^p`` times lognormal noise (σ = 1), ``p`` in {1, 2},
layer or model mode, so they sit at the budget but spread over the space.

Run: ``python -m bench.proxy_study [--work DIR] [--random 6] [--budgets 2.5 3.5]``; resumes from
``DIR/measured.jsonl`` (one line per allocation). Prints a table and writes
``bench/results/proxy_study-<date>-cpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mxmoe_jax.cli import main as cli_main

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SCHEMES = ("w2a16_g-1_asym", "w2a16_g64_asym", "w3a16_g-1_asym", "w3a16_g64_asym",
           "w4a16_g-1_asym", "w4a16_g64_asym", "w8a16_g-1_asym")
UNIFORM_AT = {2.5: "w2a16_g64_asym", 3.5: "w3a16_g64_asym", 2.125: "w2a16_g-1_asym",
              3.125: "w3a16_g-1_asym", 4.5: "w4a16_g64_asym"}
PROXIES = ("frobenius", "squared", "frobenius_fit", "squared_fit")


def run_cli(args: list[str]) -> None:
    rc = cli_main(args)
    if rc:
        raise SystemExit(f"mxmoe-jax {' '.join(args)} exited {rc}")


def setup(work: Path, model_hf: Path, calib: Path, eval_text: Path) -> None:
    """convert, trace, GPTQ calibration (FP inputs, the same 16 x 512 windows as quantize), perf."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").exists():
        run_cli(["convert", "--hf", str(model_hf), "--out", str(work / "model")])
    if not (work / "trace.json").exists():
        run_cli(["trace", "--model", str(work / "model"), "--text", str(calib), "--seqlen", "512",
              "--nsamples", "32", "--out", str(work / "trace.json")])
    if not (work / "loss.json").exists():
        run_cli(["calibrate", "--model", str(work / "model"), "--text", str(calib), "--method",
              "gptq", "--seqlen", "512", "--nsamples", "16", "--schemes", *SCHEMES,
              "--out", str(work / "loss.json")])
    if not (work / "perf.json").exists():
        run_cli(["profile", "--analytic", "H200", "--shapes", str(work / "model"), "--schemes",
              "w16a16", *SCHEMES, "--out", str(work / "perf.json")])


def _key(layers: dict) -> str:
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]


class Lab:
    """Measures allocations (quantize GPTQ + eval), cached in ``measured.jsonl``."""

    def __init__(self, work: Path, calib: Path, eval_text: Path, windows: int):
        self.work, self.calib, self.eval_text, self.windows = work, calib, eval_text, windows
        self.log = work / "measured.jsonl"
        self.done = {}
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                rec = json.loads(line)
                self.done[rec["key"]] = rec

    def by_name(self, name: str) -> dict | None:
        """The latest record measured under ``name`` (GPTQ, seed 42), or None."""
        hits = [r for r in self.done.values() if r["name"] == name and r.get("seed", 42) == 42]
        return hits[-1] if hits else None

    def measure(self, name: str, layers: dict, *, seed: int = 42, method: str = "gptq",
                hadamard: bool = False, extra: dict[str, Path] | None = None) -> dict:
        """Quantize ``layers`` (a qconfig's "layers") and evaluate: ``ppl`` on the eval text,
        ``ppl_by[name]`` on each ``extra`` text too (same seqlen and window count)."""
        key = _key(layers) + (f"-s{seed}" if seed != 42 else "") + (
            f"-{method}" if method != "gptq" else "") + ("-had" if hadamard else "")
        extra = extra or {}
        rec = self.done.get(key)
        if rec is not None and all(k in rec.get("ppl_by", {}) for k in extra):
            return rec
        q = self.work / "q.json"
        q.write_text(json.dumps({"format": "mxmoe-jax/qconfig/1", "meta": {}, "summary": {},
                                 "layers": layers}))
        out = self.work / "qmodel"
        t0 = time.time()
        cmd = ["quantize", "--model", str(self.work / "model"), "--qconfig", str(q), "--method",
               method, "--seed", str(seed), "--out", str(out), "--force"]
        if method == "gptq":
            cmd += ["--calib", str(self.calib), "--calib-windows", "16"]
        if hadamard:
            cmd += ["--hadamard"]
        run_cli(cmd)
        ppl_by = {name_: self._eval(out, text) for name_, text in
                  {"books-eval": self.eval_text, **extra}.items()}
        shutil.rmtree(out)
        rec = dict(key=key, name=name, seed=seed, method=method, hadamard=hadamard,
                   ppl=ppl_by["books-eval"], ppl_by=ppl_by,
                   seconds=round(time.time() - t0, 1), layers=layers)
        with open(self.log, "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.done[key] = rec
        print(f"  {name:<36} ppl {rec['ppl']:8.4f}  ({rec['seconds']:.0f} s)", flush=True)
        return rec

    def _eval(self, qmodel: Path, text: Path) -> float:
        res = self.work / "eval.json"
        with open(res, "w") as f:
            old = sys.stdout
            sys.stdout = f
            try:
                run_cli(["eval", "--model", str(qmodel), "--text", str(text), "--seqlen", "512",
                      "--max-windows", str(self.windows), "--json"])
            finally:
                sys.stdout = old
        return json.loads(res.read_text().strip().splitlines()[-1])["ppl"]


def study_inputs(work: Path):
    from mxmoe_jax.alloc.problem import load_inputs
    return load_inputs(work / "trace.json", work / "loss.json", work / "perf.json", batch=512,
                       schemes=list(SCHEMES))


def transform(inputs, fn):
    """Inputs whose per-block Δ [e, 3, s] of layer l is ``fn(Δ, l)``."""
    layers = [dataclasses.replace(ld, loss=fn(ld.loss, ld.layer)) for ld in inputs.layers]
    return dataclasses.replace(inputs, layers=layers)


def solve_r1(inputs, wbits: float, mode: str, granularity: str = "linear") -> dict:
    from mxmoe_jax.alloc.solve import SolveConfig, solve_allocation
    # the losses come in already transformed: the solver must take them as they are
    cfg = SolveConfig(wbits=wbits, r=1.0, mode=mode, granularity=granularity, hull=0,
                      proxy="frobenius")
    return solve_allocation(inputs, cfg, progress=False).qconfig["layers"]


def uniform(inputs, scheme: str) -> dict:
    return {ld.layer: {e: {b: scheme for b in ("gate", "up", "down")} for e in ld.experts}
            for ld in inputs.layers}


def proxy_value(inputs, layers: dict, proxy: str, alpha: dict | None = None) -> float:
    """Σ over units of the proxy for one allocation (gate and up share a unit)."""
    col = {s: j for j, s in enumerate(inputs.schemes)}
    total = 0.0
    for ld in inputs.layers:
        d = ld.loss  # [e, 3, s]
        part = 0.0
        for i, e in enumerate(ld.experts):
            a = layers[ld.layer][e]
            gu = d[i, 0, col[a["gate"]]] + d[i, 1, col[a["up"]]]
            dn = d[i, 2, col[a["down"]]]
            if proxy.startswith("squared"):
                part += d[i, 0, col[a["gate"]]] ** 2 + d[i, 1, col[a["up"]]] ** 2 + dn ** 2
            else:
                part += gu + dn
        w = alpha[proxy.removesuffix("_fit")][ld.layer] if proxy.endswith("_fit") else 1.0
        total += w * part
    return float(total)


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def study_args(doc: str) -> argparse.ArgumentParser:
    """The arguments every study program shares (work folder, model, texts, windows)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/mxmoe-proxy-study"))
    p.add_argument("--model", type=Path, default=SHARED / "models" / "qwen2moe-tiny-books")
    p.add_argument("--calib", type=Path, default=SHARED / "data" / "books-calib.txt")
    p.add_argument("--eval", type=Path, default=SHARED / "data" / "books-eval.txt")
    p.add_argument("--windows", type=int, default=16)
    return p


def main(argv: list[str] | None = None) -> int:
    p = study_args(__doc__)
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.5])
    p.add_argument("--random", type=int, default=6, help="random allocations per budget")
    p.add_argument("--seeds", type=int, default=3, help="GPTQ seeds of the uniform (noise)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    setup(args.work, args.model, args.calib, args.eval)
    lab = Lab(args.work, args.calib, args.eval, args.windows)
    inputs = study_inputs(args.work)
    fp = lab.measure("fp", uniform(inputs, "w16a16"))["ppl"]
    lowest = SCHEMES[0]

    # per-layer sensitivity: one layer at the lowest scheme, the rest FP
    alpha = {"frobenius": {}, "squared": {}}
    for ld in inputs.layers:
        layers = uniform(inputs, "w16a16")
        layers[ld.layer] = uniform(inputs, lowest)[ld.layer]
        dppl = lab.measure(f"layer {ld.layer} at {lowest}", layers)["ppl"] - fp
        for proxy in alpha:
            alpha[proxy][ld.layer] = dppl / proxy_value(_sub(inputs, ld.layer),
                                                        {ld.layer: layers[ld.layer]}, proxy)

    rng = np.random.default_rng(0)
    runs = []
    for wbits in args.budgets:
        cands = []
        uni = UNIFORM_AT.get(wbits)
        if uni:
            cands.append((f"uniform {uni}", uniform(inputs, uni), "uniform"))
            for seed in range(1, args.seeds):
                rec = lab.measure(f"uniform {uni} seed {seed}", uniform(inputs, uni), seed=seed)
                runs.append(dict(budget=wbits, name=rec["name"], kind="noise", ppl=rec["ppl"]))
        for proxy in PROXIES:
            for mode in ("layer", "model"):
                if proxy.endswith("_fit") and mode == "layer":
                    continue  # per-layer weights do not change a per-layer budget's optimum
                base = proxy.removesuffix("_fit")
                fn = (lambda d, layer: d) if base == "frobenius" else (lambda d, layer: d ** 2)
                if proxy.endswith("_fit"):
                    fn0 = fn
                    fn = (lambda d, layer, fn0=fn0, base=base: fn0(d, layer) * alpha[base][layer])
                cands.append((f"solver {proxy} {mode}", solve_r1(transform(inputs, fn), wbits,
                                                                mode), f"{proxy}/{mode}"))
        for j in range(args.random):
            pw = float(rng.choice([1.0, 2.0]))
            mode = str(rng.choice(["layer", "model"]))
            noise = {ld.layer: rng.lognormal(0.0, 1.0, ld.loss.shape) for ld in inputs.layers}
            fn = (lambda d, layer, pw=pw, noise=noise: d ** pw * noise[layer])
            name = f"random {j} (p={pw:g}, {mode})"
            # an allocation measured before is reused as it is (a solver change must not turn
            # the random sample into a new one)
            old = lab.by_name(f"{wbits} {name}")
            cands.append((name, old["layers"] if old else solve_r1(transform(inputs, fn), wbits,
                                                                   mode), "random"))
        # allocations measured at this budget by earlier versions of the solver: more points for
        # the rank correlation (they are not any proxy's pick now)
        for rec in list(lab.done.values()):
            if (rec["name"].startswith((f"{wbits} solver", f"{wbits} variant"))
                    and rec.get("seed", 42) == 42
                    and _key(rec["layers"]) not in {_key(c[1]) for c in cands}):
                name = rec["name"].split(" ", 1)[1]
                cands.append((name if "variant" in name else name + " (earlier solver)",
                              rec["layers"], "earlier"))
        print(f"budget {wbits}: {len(cands)} allocations", flush=True)
        for name, layers, kind in cands:
            rec = lab.measure(f"{wbits} {name}", layers)
            runs.append(dict(budget=wbits, name=name, kind=kind, ppl=rec["ppl"],
                             wbits=avg_bits(inputs, layers),
                             proxy={pr: proxy_value(inputs, layers, pr, alpha) for pr in PROXIES},
                             layers=layers))

    summary = {}
    for wbits in args.budgets:
        rows = [r for r in runs if r["budget"] == wbits and r["kind"] != "noise"]
        best = min(r["ppl"] for r in rows)
        noise = [r["ppl"] for r in runs if r["budget"] == wbits and (
            r["kind"] in ("noise", "uniform"))]
        std = float(np.std(noise, ddof=1)) if len(noise) > 1 else None
        summary[str(wbits)] = s = dict(best=best, n=len(rows), noise_std=std, proxies={})
        uni = [r for r in rows if r["kind"] == "uniform"]
        for proxy in PROXIES:
            rho = spearman([r["proxy"][proxy] for r in rows], [r["ppl"] for r in rows])
            picks = {r["kind"].split("/")[1]: r["ppl"] for r in rows
                     if r["kind"].startswith(proxy + "/")}
            s["proxies"][proxy] = dict(spearman=rho, picks=picks,
                                       regret={m: v - best for m, v in picks.items()})
        if uni:
            s["uniform"] = uni[0]["ppl"]
            s["removed"] = {f"{pr}/{m}": (uni[0]["ppl"] - v) / (uni[0]["ppl"] - fp)
                            for pr, d in s["proxies"].items() for m, v in d["picks"].items()}

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    out = args.out or Path(__file__).parent / "results" / f"proxy_study-{stamp}-cpu.json"
    import jax
    doc = dict(date=stamp, device=f"CPU ({platform.processor() or platform.machine()})",
               jax=jax.__version__, fp=fp, alpha=alpha, windows=args.windows, summary=summary,
               runs=runs)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
    print(f"\nFP ppl {fp:.4f}; books-eval {args.windows} x 512; wrote {out}")
    for wbits, s in summary.items():
        print(f"\nbudget {wbits} bits: {s['n']} allocations, best {s['best']:.4f}, uniform "
              f"{s.get('uniform', float('nan')):.4f}, GPTQ seed noise (std) {s['noise_std']}")
        print(f"  {'proxy':<16} {'spearman':>8}  picks (ppl; % of uniform's increase removed)")
        for proxy, d in s["proxies"].items():
            removed = s.get("removed", {})
            picks = ", ".join(f"{m} {v:.4f} ({100 * removed.get(f'{proxy}/{m}', 0):.0f}%)"
                              for m, v in d["picks"].items())
            print(f"  {proxy:<16} {d['spearman']:8.3f}  {picks}")
    return 0


def _sub(inputs, layer: str):
    return dataclasses.replace(inputs, layers=[ld for ld in inputs.layers if ld.layer == layer])


def avg_bits(inputs, layers: dict) -> float:
    from mxmoe_jax.quant.scheme import QScheme
    num = den = 0.0
    for ld in inputs.layers:
        for i, e in enumerate(ld.experts):
            for g, b in enumerate(("gate", "down")):
                k = inputs.hidden if g == 0 else int(ld.inter[i])
                n = ld.size[i, g]
                num += QScheme.parse(layers[ld.layer][e][b]).bits_per_weight(k) * n
                den += n
    return num / den


if __name__ == "__main__":
    raise SystemExit(main())
