"""Perplexity of uniform fake-quantized expert blocks with and without Hadamard rotation.

``python -m bench.rotation_ppl [--model DIR] [--text FILE] [--scheme w4a4_g-1_sym] [--gptq]``

``DIR`` is an HF folder or a MODEL_DIR (default: ``../shared/models/qwen2moe-tiny-books``).
Every routed and shared expert block gets ``--scheme`` (weights RTN, or GPTQ on ``--calib``
windows with ``--gptq``; activations fake-quantized per token); attention, router, embeddings and
head stay in fp32. Rows: FP; no rotation; rotation of the residual stream only (the original
MxMoE's ``had``); rotation plus the online rotation of every down_proj input (ours). Perplexity
with the eval protocol (non-overlapping ``--seqlen`` windows, the first ``--windows``).
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def load_flat(path: Path):
    """(cfg, flat fp32 params) of a MODEL_DIR or an HF folder."""
    from mxmoe_jax.models import io

    if (path / io.MANIFEST).is_file():
        return io.load_flat_params(path, "fp32")
    from mxmoe_jax.convert import hf_to_flax, name_map
    from mxmoe_jax.convert.safetensors_io import SafetensorsReader

    from mxmoe_jax.config import ModelConfig

    cfg = ModelConfig.from_hf(hf_to_flax.read_hf_config(path))
    with SafetensorsReader(path) as reader:
        flat = {src.key: np.asarray(name_map.to_ours(src, [reader.get(n) for n in src.hf_names]),
                                    np.float32) for src in hf_to_flax.plan(cfg, reader)}
    return cfg, flat


def main(argv=None) -> int:
    from mxmoe_jax.alloc.qconfig import Allocation
    from mxmoe_jax.data import load_tokenizer, tokenize_texts, whole_windows
    from mxmoe_jax.eval.perplexity import perplexity
    from mxmoe_jax.models import forward, from_flat_params, set_rotation
    from mxmoe_jax.quant.rotation import rotate_params
    from mxmoe_jax.quantize.apply import quantize_model
    from mxmoe_jax.quantize.gptq import gptq_weights

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=SHARED / "models" / "qwen2moe-tiny-books")
    ap.add_argument("--text", type=Path, default=SHARED / "data" / "books-eval.txt")
    ap.add_argument("--calib", type=Path, default=SHARED / "data" / "books-calib.txt")
    ap.add_argument("--scheme", default="w4a4_g-1_sym")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--gptq", action="store_true", help="also GPTQ (calibrated on --calib)")
    ap.add_argument("--seed", type=int, default=0, help="rotation sign seed")
    args = ap.parse_args(argv)
    for p in (args.model, args.text):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")

    t0 = time.perf_counter()
    cfg, flat = load_flat(args.model)
    tok = load_tokenizer(args.model)
    ev = whole_windows(tokenize_texts(tok, [args.text]), args.seqlen, args.windows)
    calib = whole_windows(tokenize_texts(tok, [args.calib]), args.seqlen, args.calib_windows) \
        if args.gptq else None

    def fp_model(c, fl, rot):
        model = from_flat_params(c, fl)
        if rot is not None and rot.online_down:
            set_rotation(model, rot)
        return model

    def ppl(model):
        return perplexity(lambda x: forward(model, x), ev).ppl

    rows = {"fp32": ppl(fp_model(cfg, flat, None))}
    print(f"fp32: {rows['fp32']:.3f}")
    variants = {"no rotation": (cfg, flat, None)}
    for label, online in (("rotation", False), ("rotation + online down", True)):
        c, fl, rot = rotate_params(cfg, flat, seed=args.seed, online_down=online)
        variants[label] = (c, fl, rot)
    for label, (c, fl, rot) in variants.items():
        alloc = Allocation.uniform(c, args.scheme)
        model = fp_model(c, fl, rot)
        rows[f"{args.scheme} rtn, {label}"] = ppl(quantize_model(model, alloc))
        print(f"{args.scheme} rtn, {label}: {rows[f'{args.scheme} rtn, {label}']:.3f}")
        if args.gptq:
            q = gptq_weights(model, calib, alloc)
            key = f"{args.scheme} gptq, {label}"
            rows[key] = ppl(quantize_model(model, alloc, q))
            print(f"{key}: {rows[key]:.3f}")
    print(json.dumps({"model": str(args.model), "text": str(args.text), "seqlen": args.seqlen,
                      "windows": int(len(ev)), "tokens": int(len(ev) * (args.seqlen - 1)),
                      "ppl": rows, "seconds": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
