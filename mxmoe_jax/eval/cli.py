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
    p.add_argument("--json", action="store_true",
                   help='print {"ppl", "tokens", "windows"} as the last stdout line')
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from mxmoe_jax.eval.perplexity import load_tokenizer, perplexity, tokenize_file, windows
    from mxmoe_jax.models import forward
    from mxmoe_jax.models.io import load_model_dir

    dtype = jnp.float32 if args.dtype == "fp32" else jnp.bfloat16
    _, model = load_model_dir(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    ids = windows(tokenize_file(tokenizer, args.text), args.seqlen, args.max_windows)
    result = perplexity(lambda batch: forward(model, batch), ids, batch_size=args.batch_size,
                        progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"ppl {result.ppl:.4f}  (mean NLL {result.nll:.5f} over {result.tokens} tokens, "
              f"{result.windows} windows of {args.seqlen})")
    return 0
