"""``mxmoe-jax eval``: perplexity of a converted or quantized model on a text file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file (the original MxMoE protocol)",
                       description=__doc__)
    p.add_argument("--model", required=True,
                   help="MODEL_DIR (`convert`) or QMODEL_DIR (`quantize`)")
    p.add_argument("--text", required=True, help="UTF-8 text file, tokenized whole")
    p.add_argument("--tokenizer", help="folder with the HF tokenizer (default: the model folder)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="parameter and compute dtype (default fp32; NLL is always f32)")
    p.add_argument("--impl", choices=("auto", "kernel", "interpret", "reference"),
                   default="auto", help="expert GEMM path (ops.grouped_matmul): auto = the "
                   "Pallas kernels on an NVIDIA GPU where they apply (bf16), else the reference")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--qconfig", help="quantize a MODEL_DIR's expert blocks in memory as this "
                                     "qconfig.json (solve)")
    q.add_argument("--scheme", help="quantize every expert block of a MODEL_DIR in memory with one "
                                    "scheme, e.g. w4a16_g128_asym (uniform)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="weight quantizer with --qconfig/--scheme (gptq needs --calib)")
    p.add_argument("--calib", nargs="+", metavar="FILE", help="GPTQ calibration text file(s)")
    p.add_argument("--calib-windows", type=int, default=16,
                   help="GPTQ calibration windows of --seqlen tokens (default 16)")
    p.add_argument("--hadamard", action="store_true",
                   help="rotate first (QuaRot-style, online down_proj rotation)")
    p.add_argument("--seed", type=int, default=42,
                   help="rotation / calibration sampling seed (default 42, as calibrate)")
    p.add_argument("--allow-quantizer-mismatch", action="store_true",
                   help="with --qconfig: quantize with --method/--hadamard even where they "
                        "differ from the quantizer its losses were measured with (a warning, "
                        "not an error)")
    p.add_argument("--json", action="store_true",
                   help='print {"ppl", "tokens", "windows"} as the last stdout line')
    p.set_defaults(func=main)

    s = sub.add_parser("sensitivity", help="per-layer loss cost of a unit of Δ² (for solve "
                       "--sensitivity)", description=(
                           "For each MoE layer alone, quantize every expert block with --scheme "
                           "(RTN) and measure the NLL increase on calibration windows and the "
                           "layer's Σ Δ²; alpha = their ratio weighs the layers in `solve "
                           "--sensitivity --mode model`."))
    s.add_argument("--model", required=True, help="MODEL_DIR written by `mxmoe-jax convert`")
    s.add_argument("--text", required=True, nargs="+", metavar="FILE",
                   help="calibration text file(s)")
    s.add_argument("--tokenizer", help="folder with the HF tokenizer (default: the model folder)")
    s.add_argument("--scheme", default="w2a16_g-1_asym",
                   help="reference scheme each layer is quantized with (default w2a16_g-1_asym)")
    s.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    s.add_argument("--nsamples", type=int, default=16, help="windows (default 16)")
    s.add_argument("--seed", type=int, default=42, help="window sampling seed (default 42)")
    s.add_argument("--batch", type=int, default=4, help="windows per forward pass (default 4)")
    s.add_argument("--layers", type=int, nargs="+", help="MoE layers to measure (default all)")
    s.add_argument("--out", required=True, help="sensitivity.json to write")
    s.add_argument("--force", action="store_true", help="overwrite an existing --out")
    s.set_defaults(func=_sensitivity)


def main(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from mxmoe_jax.data import (
        check_seqlen,
        check_text_length,
        check_tokenizer,
        load_tokenizer,
        tokenize_texts,
        whole_windows,
    )
    from mxmoe_jax.eval.perplexity import perplexity
    from mxmoe_jax.models import forward
    from mxmoe_jax.ops import kernel_mode
    from mxmoe_jax.quantize.checkpoint import is_qmodel_dir, load_any

    in_memory = args.qconfig or args.scheme or args.hadamard
    if in_memory and is_qmodel_dir(args.model):
        raise ValueError("--qconfig/--scheme/--hadamard: the model is already quantized (a "
                         "QMODEL_DIR); evaluate it without them")
    if args.qconfig:  # a qconfig made for another quantizer fails before any work is done
        from mxmoe_jax.quantize.pipeline import check_quantizer

        check_quantizer(args.qconfig, _config(args),
                        allow_mismatch=args.allow_quantizer_mismatch)
    dtype = jnp.float32 if args.dtype == "fp32" else jnp.bfloat16
    cfg = _model_config(args.model)
    check_seqlen(cfg, args.seqlen)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    check_tokenizer(tokenizer, cfg, args.tokenizer or args.model)
    ids = tokenize_texts(tokenizer, [args.text])
    check_text_length(ids, [args.text], args.seqlen)
    ids = whole_windows(ids, args.seqlen, args.max_windows)
    if in_memory:
        model = _quantize(args, dtype)
    else:
        _, model = load_any(args.model, dtype=dtype)

    def logits_fn(batch):
        with kernel_mode(args.impl):
            return forward(model, batch)

    result = perplexity(logits_fn, ids, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"ppl {result.ppl:.4f}  (mean NLL {result.nll:.5f} over {result.tokens} tokens, "
              f"{result.windows} windows of {args.seqlen})")
    return 0


def _model_config(path: str):
    """The ModelConfig of a MODEL_DIR or QMODEL_DIR (both carry model.json), no weights read."""
    from mxmoe_jax.models.io import load_config

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model: {path} is not a folder (a MODEL_DIR from `convert` or "
                                "a QMODEL_DIR from `quantize`)")
    return load_config(path)


def _config(args: argparse.Namespace):
    from mxmoe_jax.quantize.pipeline import QuantizeConfig

    return QuantizeConfig(method=args.method, hadamard=args.hadamard, seed=args.seed,
                          calib=tuple(args.calib or ()), calib_windows=args.calib_windows,
                          seqlen=args.seqlen)


def _quantize(args: argparse.Namespace, dtype):
    """The MODEL_DIR quantized in memory (as `quantize` would write it), in ``dtype``."""
    import jax.numpy as jnp

    from mxmoe_jax.models.io import load_model_dir
    from mxmoe_jax.quantize.pipeline import quantize_in_memory, resolve_allocation

    config = _config(args)
    cfg, model = load_model_dir(args.model, dtype=jnp.float32)
    if args.qconfig or args.scheme:
        allocation = resolve_allocation(cfg, qconfig=args.qconfig, scheme=args.scheme)
    else:
        from mxmoe_jax.alloc.qconfig import Allocation

        allocation = Allocation(cfg, {})  # --hadamard alone: the rotated FP model
    qmodel, _, _ = quantize_in_memory(model, allocation, config, tokenizer_dir=args.model,
                                      progress=not args.json)
    if dtype != jnp.float32:
        raise ValueError("--dtype: in-memory quantization runs in fp32 (the reference form); "
                         "write a QMODEL_DIR with `quantize` to evaluate it in bf16")
    return qmodel


def _sensitivity(args: argparse.Namespace) -> int:
    from mxmoe_jax.eval.sensitivity import main_sensitivity

    return main_sensitivity(args)
