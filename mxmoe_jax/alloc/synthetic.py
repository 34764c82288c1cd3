"""Synthetic trace.json and loss.json for tests, timing and demos without a model.

Expert loads are Zipf-like with a few empty experts; a block's loss under scheme s is
``base[layer, expert, block] * 4^-(effective bits of s) * noise``: quantization noise power falls
by 4x per weight bit (uniform quantizer), per-channel scales cost about half a bit against g128, and
activation quantization adds noise of its own (4-bit activations much more than 8-bit). Only the
*shape* matters here: it gives the solver realistic trade-offs (fewer bits lose more, w4a4 is fast
and lossy, w8a8 fast and good). Run ``python -m mxmoe_jax.alloc.synthetic --out DIR`` to write both
files (Qwen1.5-MoE-sized by default).
"""

from __future__ import annotations

import argparse

import numpy as np

from mxmoe_jax.jsonio import LOSS_FORMAT, TRACE_FORMAT
from mxmoe_jax.quant.scheme import QScheme


def synthetic_trace(*, num_layers: int = 24, num_experts: int = 60, top_k: int = 4,
                    moe_inter: int = 1408, hidden: int = 2048, shared_ratio: float = 4.0,
                    num_tokens: int = 4096, seed: int = 0, model: str = "synthetic") -> dict:
    """A trace.json dict (``mxmoe-jax/trace/1``)."""
    rng = np.random.default_rng(seed)
    out = {"format": TRACE_FORMAT, "model": model, "text": ["synthetic"], "topk": top_k,
           "NK": [moe_inter, hidden], "num_layers": num_layers, "num_tokens": num_tokens,
           "num_samples": 1, "num_shared_experts": float(shared_ratio),
           "moe_layers": list(range(num_layers))}
    for layer in range(num_layers):
        w = rng.permutation(1.0 / np.arange(1, num_experts + 1) ** 0.8)
        w[rng.random(num_experts) < 0.05] = 0.0  # a few experts see no token
        w /= w.sum()
        freq = np.round(w * num_tokens * top_k).astype(int)
        out[f"layer-{layer}"] = {"access_freq": freq.tolist(),
                                 "weights_sum": (freq * rng.uniform(0.2, 0.4)).round(3).tolist()}
    return out


def _effective_bits(s: QScheme) -> float:
    if s.w_bits == 16:
        return 16.0
    if s.fp8:
        bits = 6.0
    else:  # per-channel scales cost ~half a bit against g128; a symmetric grid ~0.3 bit
        bits = s.w_bits - (0.5 if s.group_size == -1 else 0.0) - (0.3 if s.sym else 0.0)
    if s.a_bits < 16:  # activation noise: a4 hurts far more than a8
        bits = min(bits, {8: 7.0, 4: 3.2}[s.a_bits])
    return bits


def synthetic_loss(trace: dict, schemes, *, seed: int = 0, method: str = "rtn") -> dict:
    """A loss.json dict (``mxmoe-jax/loss/1``) for every MoE layer and expert of ``trace``."""
    rng = np.random.default_rng(seed + 1)
    names = [QScheme.parse(s).name for s in schemes]
    has_shared = float(trace.get("num_shared_experts", 0)) > 0
    losses = {n: {} for n in names}
    for layer in trace["moe_layers"]:
        freq = np.asarray(trace[f"layer-{layer}"]["access_freq"], dtype=float)
        tokens = np.append(freq, trace["num_tokens"]) if has_shared else freq
        # blocks routed more tokens contribute more output error; down is the most sensitive
        base = (np.sqrt(tokens + 1.0)[:, None] * rng.lognormal(0, 0.5, (len(tokens), 3))
                * np.array([1.0, 1.0, 2.0]))
        for n in names:
            eff = _effective_bits(QScheme.parse(n))
            scale = 0.0 if eff >= 16 else 4.0 ** (-eff) * 1e4
            vals = base * scale * rng.lognormal(0, 0.1, base.shape)
            losses[n][str(layer)] = {str(e): [round(float(v), 8) for v in row]
                                     for e, row in enumerate(vals)}
    return {"format": LOSS_FORMAT,
            "meta": {"model": trace.get("model", "synthetic"), "method": method, "hadamard": False,
                     "metric": "layer_out_norm", "text": ["synthetic"],
                     "num_tokens": trace["num_tokens"], "seqlen": trace["num_tokens"],
                     "seed": seed, "schemes": names},
            "losses": losses}


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from mxmoe_jax.jsonio import write_json_atomic
    from mxmoe_jax.perf.analytic import DEFAULT_SCHEMES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for trace.json and loss.json")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    trace = synthetic_trace(num_layers=args.layers, num_experts=args.experts, seed=args.seed)
    loss = synthetic_loss(trace, [s for s in DEFAULT_SCHEMES if "fp8" not in s], seed=args.seed)
    write_json_atomic(Path(args.out) / "trace.json", trace)
    write_json_atomic(Path(args.out) / "loss.json", loss)
    print(f"wrote {args.out}/trace.json and loss.json ({args.layers} layers x "
          f"{args.experts}+1 experts, {len(loss['losses'])} schemes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

