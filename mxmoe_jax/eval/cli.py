"""``mxmoe-jax eval``: perplexity of a converted (or quantized) model on a text file."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file (the original MxMoE protocol)",
                       description=__doc__)
    p.add_argument("--model", required=True, help="MODEL_DIR written by `mxmoe-jax convert`")
    p.add_argument("--text", required=True, help="UTF-8 text file, tokenized whole")
    p.add_argument("--tokenizer", help="folder with the HF tokenizer (default: the model folder)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="parameter and compute dtype (default fp32; NLL is always f32)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--qconfig", help="quantize the expert blocks as this qconfig.json (solve)")
    q.add_argument("--scheme", help="quantize every expert block with one scheme, e.g. "
                                    "w4a16_g128_asym (uniform)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="weight quantizer with --qconfig/--scheme (gptq needs --calib)")
    p.add_argument("--calib", nargs="+", metavar="FILE", help="GPTQ calibration text file(s)")
    p.add_argument("--calib-windows", type=int, default=16,
                   help="GPTQ calibration windows of --seqlen tokens (default 16)")
    p.add_argument("--hadamard", action="store_true",
                   help="rotate first (QuaRot-style, online down_proj rotation)")
    p.add_argument("--seed", type=int, default=42,
                   help="rotation / calibration sampling seed (default 42, as calibrate)")
    p.add_argument("--json", action="store_true",
                   help='print {"ppl", "tokens", "windows"} as the last stdout line')
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from mxmoe_jax.eval.perplexity import load_tokenizer, perplexity, tokenize_file, windows
    from mxmoe_jax.models import forward
    from mxmoe_jax.models.io import load_model_dir

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    ids = windows(tokenize_file(tokenizer, args.text), args.seqlen, args.max_windows)
    if args.qconfig or args.scheme or args.hadamard:
        logits_fn = _quantized(args, tokenizer)
    else:
        dtype = jnp.float32 if args.dtype == "fp32" else jnp.bfloat16
        _, model = load_model_dir(args.model, dtype=dtype)
        logits_fn = lambda batch: forward(model, batch)  # noqa: E731
    result = perplexity(logits_fn, ids, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"ppl {result.ppl:.4f}  (mean NLL {result.nll:.5f} over {result.tokens} tokens, "
              f"{result.windows} windows of {args.seqlen})")
    return 0


def _quantized(args: argparse.Namespace, tokenizer):
    """Logits function of the fake-quantized model (fp32 reference form)."""
    from mxmoe_jax.alloc.qconfig import load_qconfig
    from mxmoe_jax.calib.data import sample_windows, tokenize_texts
    from mxmoe_jax.eval.quantized import plan_from_qconfig, quantized_logits_fn
    from mxmoe_jax.models.io import load_flat_params
    from mxmoe_jax.quant.fakequant import QuantPlan

    if args.dtype != "fp32":
        raise ValueError("--dtype: quantized evaluation runs in fp32 (the reference form)")
    cfg, flat = load_flat_params(args.model, "fp32")
    if args.qconfig:
        plan = plan_from_qconfig(cfg, load_qconfig(args.qconfig))
    elif args.scheme:
        plan = QuantPlan.uniform(cfg, args.scheme)
    else:
        plan = None
    calib = None
    if args.method == "gptq" and plan is not None:
        if not args.calib:
            raise ValueError("--method gptq needs --calib FILE (calibration text)")
        calib = sample_windows(tokenize_texts(tokenizer, args.calib), args.seqlen,
                               args.calib_windows, seed=args.seed)
    return quantized_logits_fn(cfg, flat, plan, method=args.method, hadamard=args.hadamard,
                               seed=args.seed, calib_windows=calib, progress=not args.json)
