"""Before/after check of the one-forward redesign: fake-quant logits and GPTQ weights.

Run once with the code before the redesign on ``PYTHONPATH`` (commit 814d8c0, e.g. a git worktree)
and once with the current code, each writing an ``.npz``; then compare::

    PYTHONPATH=/tmp/before python bench/redesign_parity.py save --model MODEL_DIR \
        --qconfig Q.json --calib books-calib.txt --out before.npz
    PYTHONPATH=. python bench/redesign_parity.py save ... --out after.npz
    python bench/redesign_parity.py compare before.npz after.npz

Cases: RTN with the Hadamard rotation (online down_proj rotation), and GPTQ (4 windows of 128
calibration tokens); logits of 2 windows of 128 tokens of the calibration text, fp32, and the
dequantized GPTQ weights of every allocated block (gate and up columns of the fused gate_up).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _save(args) -> None:
    import jax.numpy as jnp

    from mxmoe_jax.models.io import load_flat_params, load_model_dir

    try:
        from mxmoe_jax.data import load_tokenizer, sample_windows, tokenize_texts
    except ImportError:
        from mxmoe_jax.calib.data import sample_windows, tokenize_texts
        from mxmoe_jax.eval.perplexity import load_tokenizer
    tok = load_tokenizer(args.model)
    ids = tokenize_texts(tok, [args.calib])
    calib = sample_windows(ids, 128, 4, seed=1)
    test = np.asarray(sample_windows(ids, 128, 2, seed=2))
    out = {}
    try:
        from mxmoe_jax.alloc.qconfig import load_qconfig
        from mxmoe_jax.models import forward
        from mxmoe_jax.quantize.pipeline import (
            QuantizeConfig,
            quantize_in_memory,
            resolve_allocation,
        )

        cfg, model = load_model_dir(args.model, dtype=jnp.float32)
        alloc = resolve_allocation(cfg, qconfig=load_qconfig(args.qconfig))
        q, _, _ = quantize_in_memory(model, alloc, QuantizeConfig(hadamard=True, seed=7))
        out["rtn_hadamard"] = np.asarray(forward(q, jnp.asarray(test)))
        from mxmoe_jax.quantize.gptq import gptq_weights

        codes = gptq_weights(model, calib, alloc)
        from mxmoe_jax.quantize.apply import quantize_model

        out["gptq"] = np.asarray(forward(quantize_model(model, alloc, codes), jnp.asarray(test)))
        from mxmoe_jax.quant.qtensor import dequantize

        for (li, e, proj), qw in codes.items():
            w = np.asarray(dequantize(qw))
            if proj == "gate_up":
                half = w.shape[-1] // 2
                out[f"w/{li}/{e}/gate"], out[f"w/{li}/{e}/up"] = w[..., :half], w[..., half:]
            else:
                out[f"w/{li}/{e}/down"] = w
    except ImportError:  # the code before the redesign
        from mxmoe_jax.eval.quantized import plan_from_qconfig, quantized_logits_fn
        from mxmoe_jax.quant.model_gptq import gptq_model

        from mxmoe_jax.alloc.qconfig import load_qconfig
        from mxmoe_jax.models import from_flat_params
        from mxmoe_jax.quant.qtensor import dequantize

        cfg, flat = load_flat_params(args.model, "fp32")
        plan = plan_from_qconfig(cfg, load_qconfig(args.qconfig))
        f = quantized_logits_fn(cfg, flat, plan, hadamard=True, seed=7)
        out["rtn_hadamard"] = np.asarray(f(jnp.asarray(test)))
        f = quantized_logits_fn(cfg, flat, plan, method="gptq", calib_windows=calib)
        out["gptq"] = np.asarray(f(jnp.asarray(test)))
        codes = gptq_model(from_flat_params(cfg, flat, jnp.float32), calib, plan)
        for (li, e, b), qw in codes.items():
            out[f"w/{li}/{e}/{b}"] = np.asarray(dequantize(qw))
    np.savez(args.out, **out)
    print(f"wrote {args.out}: {len(out)} arrays")


def _compare(a_path, b_path) -> int:
    a, b = np.load(a_path), np.load(b_path)
    keys = sorted(set(a.files) | set(b.files))
    worst, bad = 0.0, []
    for k in keys:
        if k not in a.files or k not in b.files:
            bad.append(f"{k}: only in one file")
            continue
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        rel = np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)
        worst = max(worst, rel)
        if not k.startswith("w/"):
            print(f"{k:>14}: relative difference {rel:.3e} (max |a-b| {np.abs(x - y).max():.3e})")
    n_w = sum(k.startswith("w/") for k in keys)
    w_rel = max((np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-30)
                 for k in keys if k.startswith("w/") and k in a.files and k in b.files),
                default=0.0)
    print(f"GPTQ weights: {n_w} blocks, largest relative difference {w_rel:.3e}")
    for line in bad:
        print(line)
    print(f"largest relative difference {worst:.3e}")
    return 1 if bad or worst > 1e-5 else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("--model", required=True)
    s.add_argument("--qconfig", required=True)
    s.add_argument("--calib", required=True)
    s.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args(argv)
    if args.cmd == "save":
        _save(args)
        return 0
    return _compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
