"""``mxmoe-jax run``: the whole pipeline in one command, ending in a short report.

With no ``--model`` it first trains the embedded default (``mxmoe_jax.default_model``: a tiny
Qwen2-MoE trained for about a minute on text that ships with Python) and exports it to a Hugging
Face folder, so every run starts from HF format. Each stage writes its artifact into ``--out``:

    hf/            the default model in HF format (only without --model)
    model/         converted Flax model (Orbax)                       <- convert
    trace.json     tokens per expert per layer (+ trace.png)           <- trace
    loss.json      Δ per (layer, expert, block, scheme)                <- calibrate
    perf.json      kernel cost table (analytic roofline of --device)   <- profile
    qconfig.json   scheme per block (+ pareto.csv, frontier/heatmap)   <- solve
    report.json    every stage's numbers, and the perplexity of the FP model, of each uniform
                   scheme and of the mixed allocation; report.md the same as tables
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
    p.add_argument("--wbits", type=float, default=3.25,
                   help="average weight bits of the allocation, scales included (default 3.25)")
    p.add_argument("--abits", type=float,
                   help="average activation bits (weight-activation schemes; e.g. --wbits 5 "
                        "--abits 5); default: weight-only schemes")
    p.add_argument("--schemes", nargs="+", metavar="S",
                   help="candidate schemes (default: w2/w3/w4 g128 asym + w8 per-channel for "
                        "weight-only; w4a4 g-1/g128 + w8a8 with --abits); a group size that "
                        "does not divide a block's K is replaced there by a smaller one that "
                        "does (noted on stderr)")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="weight quantizer for calibration and evaluation (default rtn)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--batch", type=int, default=512,
                   help="tokens per forward pass that the allocation optimises for")
    p.add_argument("--r", type=float,
                   help="solver trade-off L^r T^(1-r) (default: 1 for weight-only budgets, 0.75 "
                        "with --abits, as the paper)")
    p.add_argument("--device", default="H200",
                   help="device of the analytic kernel cost table (default H200)")
    p.add_argument("--force", action="store_true", help="overwrite the stages' outputs in --out")
    p.set_defaults(func=main)


def _stage(report: dict, name: str, fn):
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    result = fn()
    report["stages"][name] = {"seconds": round(time.perf_counter() - start, 2), **(result or {})}
    return result


def main(args: argparse.Namespace) -> int:

    from mxmoe_jax.convert.hf_to_flax import convert_hf

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"--out {out} is not empty; pass --force to overwrite its stages")
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"out": str(out), "stages": {}}

    if args.model:
        hf_dir = Path(args.model)
        if not args.calib or not args.eval_text:
            raise ValueError("--calib and --eval are required with --model")
        calib, eval_text = args.calib, args.eval_text
    else:
        from mxmoe_jax.default_model import DefaultRecipe, train_default_model

        hf_dir = out / "hf"
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        recipe = DefaultRecipe(max_steps=args.train_steps)
        _stage(report, "train default model", lambda: train_default_model(hf_dir, recipe))
        calib = args.calib or [str(hf_dir / "calib.txt")]
        eval_text = args.eval_text or str(hf_dir / "eval.txt")

    model_dir = out / "model"

    def convert():
        r = convert_hf(hf_dir, model_dir, dtype="fp32", force=True, progress=True)
        return {"params": r.num_params, "peak_rss_mib": round(r.peak_rss_bytes / 2**20, 1)}

    _stage(report, "convert", convert)

    seq = ["--seqlen", str(args.seqlen), "--nsamples", str(args.nsamples)]
    _stage(report, "trace", lambda: _cli(
        ["trace", "--model", str(model_dir), "--text", *calib, "--out", str(out / "trace.json"),
         "--plot", str(out / "trace.png"), *seq, "--force"]))
    schemes = args.schemes or (ACT_SCHEMES if args.abits else WEIGHT_ONLY_SCHEMES)
    _stage(report, "calibrate", lambda: _cli(
        ["calibrate", "--model", str(model_dir), "--text", *calib, "--schemes", *schemes,
         "--method", args.method, "--out", str(out / "loss.json"), *seq, "--force"]))
    _stage(report, "profile", lambda: _cli(
        ["profile", "--analytic", args.device, "--shapes", str(model_dir), "--schemes",
         "w16a16", *_with_substitutes(schemes, model_dir), "--out", str(out / "perf.json"),
         "--force"]))
    budget = ["--wbits", str(args.wbits)] + (["--abits", str(args.abits)] if args.abits else [])

    r = args.r if args.r is not None else (0.75 if args.abits else 1.0)

    def solve():
        _cli(["solve", "--trace", str(out / "trace.json"), "--loss", str(out / "loss.json"),
              "--perf", str(out / "perf.json"), *budget, "--batch", str(args.batch),
              "--r", str(r), "--out", str(out / "qconfig.json"), "--force"])
        summary = json.loads((out / "qconfig.json").read_text())["summary"]
        return {k: summary[k] for k in ("wbits", "abits", "L", "T_us") if k in summary}

    _stage(report, "solve", solve)
    _stage(report, "eval", lambda: _evaluate(args, model_dir, calib, eval_text, schemes, out))

    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = _tables(report)
    (out / "report.md").write_text(table + "\n")
    print(table)
    return 0


# g128 where it divides a block's K; elsewhere (the tiny models' down_proj, K = 192) calibrate,
# solve and quantize all use the group size `QScheme.for_k` substitutes (g96 there).
WEIGHT_ONLY_SCHEMES = ("w2a16_g128_asym", "w3a16_g128_asym", "w4a16_g128_asym", "w8a16_g-1_asym")
ACT_SCHEMES = ("w4a4_g-1_sym", "w4a4_g128_sym", "w8a8_g-1_sym")


def _with_substitutes(schemes, model_dir: Path) -> list[str]:
    """``schemes`` plus what each is in this model's GEMMs (``QScheme.for_k`` of every K): solve
    times a block with the scheme it is quantized with, so perf.json needs those too."""
    from mxmoe_jax.perf.shapes import load_shapes
    from mxmoe_jax.quant.scheme import QScheme

    ks = sorted({k for _, k in load_shapes(str(model_dir)).gemms()})
    names = [QScheme.parse(s).name for s in schemes]
    return list(dict.fromkeys(names + [QScheme.parse(s).for_k(k).name for s in names
                                       for k in ks]))


def _cli(argv: list[str]) -> None:
    from mxmoe_jax.cli import main as cli_main

    rc = cli_main(argv)
    if rc:
        raise RuntimeError(f"stage `mxmoe-jax {argv[0]}` failed with exit code {rc}")


def _evaluate(args, model_dir: Path, calib, eval_text: str, schemes, out: Path) -> dict:
    """Perplexity of the FP model, of every uniform scheme, and of the mixed allocation."""
    import jax.numpy as jnp

    from mxmoe_jax.alloc.qconfig import Allocation, load_qconfig
    from mxmoe_jax.data import load_tokenizer, tokenize_texts, whole_windows
    from mxmoe_jax.eval.perplexity import perplexity
    from mxmoe_jax.models import forward
    from mxmoe_jax.models.io import load_model_dir
    from mxmoe_jax.quant.scheme import QScheme
    from mxmoe_jax.quantize.pipeline import QuantizeConfig, quantize_in_memory

    cfg, model = load_model_dir(model_dir, dtype=jnp.float32)
    tok = load_tokenizer(model_dir)
    ids = whole_windows(tokenize_texts(tok, [eval_text]), args.seqlen, args.max_windows)
    config = QuantizeConfig(method=args.method, calib=tuple(calib) if args.method == "gptq"
                            else (), calib_windows=args.nsamples, seqlen=args.seqlen)
    qconfig = load_qconfig(out / "qconfig.json")
    rows = {"fp32": (16.0, None)}
    uniform = qconfig["summary"].get("uniform", {})  # the solver's bits, per-channel scales counted
    rows.update({s: ((uniform.get(s) or {}).get("wbits", QScheme.parse(s).bits_per_weight()),
                     Allocation.uniform(cfg, s)) for s in schemes})
    rows[f"mixed (solve, {args.wbits} bits)"] = (qconfig["summary"]["wbits"],
                                                 Allocation.from_qconfig(cfg, qconfig))
    result = {"text": eval_text, "windows": int(ids.shape[0]), "ppl": {}}
    for name, (bits, allocation) in rows.items():
        m = model if allocation is None else quantize_in_memory(
            model, allocation, config, tokenizer_dir=model_dir)[0]
        ppl = perplexity(lambda batch, m=m: forward(m, batch), ids).ppl
        result["ppl"][name] = {"wbits": round(bits, 3), "ppl": round(ppl, 4)}
        print(f"  {name:<32} wbits {bits:6.3f}  ppl {result['ppl'][name]['ppl']}", flush=True)
    return result


def _tables(report: dict) -> str:
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {r['seconds']} |" for name, r in report["stages"].items()]
    ev = report["stages"]["eval"]
    lines += ["", f"Perplexity on {ev['text']} ({ev['windows']} windows):", "",
              "| model | avg weight bits | ppl |", "|---|---|---|"]
    lines += [f"| {k} | {v['wbits']} | {v['ppl']} |" for k, v in ev["ppl"].items()]
    return "\n".join(lines)
