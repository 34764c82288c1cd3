"""``mxmoe-jax run``: the whole pipeline in one command, ending in a short report.

With no ``--model`` it first trains the embedded default (``mxmoe_jax.default_model``: a tiny
Qwen2-MoE trained for about a minute on text that ships with Python) and exports it to a Hugging
Face folder, so every run starts from HF format. Each stage writes its artifact into ``--out``:

    hf/          the default model in HF format (only without --model)
    model/       converted Flax model (Orbax)            <- convert
    report.json  every stage's numbers; report.md the same as a table
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline (default: the embedded tiny model)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF folder (config.json + safetensors); default: train the "
                                   "embedded tiny Qwen2-MoE")
    p.add_argument("--out", required=True, help="output folder for every artifact")
    p.add_argument("--calib", nargs="+", help="calibration text file(s) (default model: its own)")
    p.add_argument("--eval", dest="eval_text", help="evaluation text file (default model: its own)")
    p.add_argument("--seqlen", type=int, default=512, help="window length for eval and calibration")
    p.add_argument("--max-windows", type=int, default=16, help="eval windows")
    p.add_argument("--train-steps", type=int, default=300,
                   help="training steps of the embedded default model (default 300)")
    p.add_argument("--force", action="store_true", help="overwrite the stages' outputs in --out")
    p.set_defaults(func=main)


def _stage(report: dict, name: str, fn):
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    result = fn()
    report["stages"][name] = {"seconds": round(time.perf_counter() - start, 2), **(result or {})}
    return result


def main(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from mxmoe_jax.convert.hf_to_flax import convert_hf
    from mxmoe_jax.eval.perplexity import load_tokenizer, perplexity, tokenize_file, windows
    from mxmoe_jax.models import forward
    from mxmoe_jax.models.io import load_model_dir

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to overwrite its stages")
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"out": str(out), "stages": {}}

    if args.model:
        hf_dir = Path(args.model)
        if not args.calib or not args.eval_text:
            raise ValueError("--calib and --eval are required with --model")
        eval_text = args.eval_text
    else:
        from mxmoe_jax.default_model import DefaultRecipe, train_default_model

        hf_dir = out / "hf"
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        recipe = DefaultRecipe(max_steps=args.train_steps)
        _stage(report, "train default model", lambda: train_default_model(hf_dir, recipe))
        eval_text = args.eval_text or str(hf_dir / "eval.txt")

    model_dir = out / "model"

    def convert():
        r = convert_hf(hf_dir, model_dir, dtype="fp32", force=True, progress=True)
        return {"params": r.num_params, "peak_rss_mib": round(r.peak_rss_bytes / 2**20, 1)}

    _stage(report, "convert", convert)

    def evaluate():
        _, model = load_model_dir(model_dir, dtype=jnp.float32)
        ids = windows(tokenize_file(load_tokenizer(model_dir), eval_text), args.seqlen,
                      args.max_windows)
        r = perplexity(lambda b: forward(model, b), ids)
        return {"text": eval_text, **r.to_dict()}

    _stage(report, "eval fp32", evaluate)

    (out / "report.json").write_text(json.dumps(report, indent=2))
    lines = ["| stage | seconds | result |", "|---|---|---|"]
    for name, r in report["stages"].items():
        rest = ", ".join(f"{k}={v}" for k, v in r.items() if k != "seconds")
        lines.append(f"| {name} | {r['seconds']} | {rest} |")
    table = "\n".join(lines)
    (out / "report.md").write_text(table + "\n")
    print(table)
    return 0
