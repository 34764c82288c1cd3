"""``mxmoe-jax run``: the whole pipeline in one command, ending in a report.

With no ``--model`` it first trains the embedded default (``mxmoe_jax.default_model``: a tiny
Qwen2-MoE trained for a few minutes on text that ships with Python) and exports it to a Hugging
Face folder, so every run starts from HF format. Each stage writes its artifact into ``--out``:

    hf/            the default model in HF format (only without --model)
    model/         converted Flax model (Orbax)                       <- convert
    trace.json     tokens per expert per layer (+ trace.png)           <- trace
    loss.json      Δ per (layer, expert, block, scheme)                <- calibrate
    perf.json      kernel cost table (measured here; else --device's roofline) <- profile
    qconfig.json   scheme per block (+ pareto.csv, frontier/heatmap)   <- solve
    *-PRESET.json  trace, loss, perf and qconfig at a preset's shapes  <- --shapes-of PRESET
    qmodel/        the quantized model (QMODEL_DIR: packed weights)    <- quantize
    bench/         device time of the MoE layers (NVIDIA GPU only)     <- bench
    report.json    every stage's numbers: the perplexity of the FP model, of each uniform scheme
                   (quantized in memory) and of the mixed allocation (the QMODEL_DIR itself);
                   report.md the same as tables, with the PNGs

Resuming. ``stages.json`` records each finished stage with the settings it ran with; a rerun on
the same ``--out`` (after a kill, say) skips every stage whose settings, and those of the stages
before it, are unchanged and whose artifacts exist, and redoes the rest. Artifacts are written
to a temporary name and renamed, so a killed stage leaves nothing that looks finished.
``--fresh`` (or ``--force``) empties a run folder first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

STAGES_FILE = "stages.json"


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
                   help="device of the analytic kernel cost table where no NVIDIA GPU is here to "
                        "measure on (default H200)")
    p.add_argument("--bench-tokens", nargs="+", type=int, default=[32, 1024, 8192],
                   help="token counts of the bench stage (NVIDIA GPU only)")
    p.add_argument("--shapes-of", metavar="PRESET",
                   help="also solve at a real-sized layer shape (a perf.shapes preset, e.g. "
                        "qwen1.5-moe) with this model's trace and loss pattern scaled to it: "
                        "speed at the preset's shapes, accuracy from this model")
    p.add_argument("--devices", type=int, default=1,
                   help="expert parallelism over N JAX devices: calibrate with the routed experts "
                        "sharded and solve for the busiest device's time (calibrate/solve "
                        "--devices; default 1)")
    p.add_argument("--fresh", action="store_true",
                   help="empty the run folder --out first (default: resume it)")
    p.add_argument("--force", action="store_true", help="the same as --fresh")
    p.set_defaults(func=main)


class Stages:
    """The finished stages of one run folder (``stages.json``), and the runner that skips them."""

    def __init__(self, out: Path, report: dict):
        self.out = out
        self.path = out / STAGES_FILE
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.report = report
        self.chain = ""  # digest of the settings of every stage so far

    def run(self, name: str, settings: dict, outputs: list[str], fn):
        """Run ``fn`` unless stage ``name`` finished with these settings (and the stages before
        it with theirs) and its ``outputs`` (paths in --out) exist; returns its result."""
        blob = json.dumps({"before": self.chain, "settings": settings}, sort_keys=True,
                          default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:16]
        self.chain = key
        prev = self.done.get(name)
        if prev and prev["key"] == key and all((self.out / o).exists() for o in outputs):
            print(f"== {name} (finished earlier: reused)", flush=True)
            self.report["stages"][name] = {**prev["record"], "reused": True}
            return prev["record"].get("result")
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        result = fn()
        record = {"seconds": round(time.perf_counter() - start, 2)}
        if result is not None:
            record["result"] = result
        self.done[name] = {"key": key, "record": record}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        tmp.replace(self.path)
        self.report["stages"][name] = record
        return result


def _prepare_out(out: Path, fresh: bool) -> None:
    """A new, empty or resumable run folder; ``fresh`` empties a run folder."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    is_run = (out / STAGES_FILE).is_file() or (out / "report.json").is_file()
    if out.exists() and any(out.iterdir()):
        if not is_run:
            raise FileExistsError(f"--out {out} is not empty and not a run folder (no "
                                  f"{STAGES_FILE}); choose another folder")
        if fresh:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.model and (not args.calib or not args.eval_text):
        raise ValueError("--calib and --eval are required with --model")
    if args.shapes_of:
        from mxmoe_jax.perf.shapes import PRESETS

        if args.shapes_of not in PRESETS:
            raise ValueError(f"--shapes-of: {args.shapes_of!r} is not one of {', '.join(PRESETS)}")
    if args.devices != 1:
        import jax

        if not 1 <= args.devices <= len(jax.devices()):
            raise ValueError(f"--devices: {args.devices} is not between 1 and the "
                             f"{len(jax.devices())} JAX devices here (on the CPU, simulate more "
                             "with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    if args.model and not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model: {args.model} has no config.json (a Hugging Face "
                                "checkpoint folder is expected)")
    for f in [*(args.calib or []), *([args.eval_text] if args.eval_text else [])]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--calib/--eval: text file {f} does not exist")
    created = not out.exists()
    _prepare_out(out, args.fresh or args.force)
    try:
        return _run(args, out)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an error before any stage wrote something leaves no empty --out
        raise


def _run(args: argparse.Namespace, out: Path) -> int:
    import jax

    from mxmoe_jax.convert.hf_to_flax import convert_hf

    report: dict = {"out": str(out), "stages": {}}
    st = Stages(out, report)

    if args.model:
        hf_dir = Path(args.model)
        calib, eval_text = args.calib, args.eval_text
        st.chain = hashlib.sha256(str(hf_dir.resolve()).encode()).hexdigest()[:16]
    else:
        from mxmoe_jax.default_model import DefaultRecipe, train_default_model

        hf_dir = out / "hf"
        recipe = DefaultRecipe(max_steps=args.train_steps)

        def train():
            tmp = out / "hf.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            train_default_model(tmp, recipe)
            if hf_dir.exists():
                shutil.rmtree(hf_dir)
            tmp.replace(hf_dir)

        st.run("train default model", {"recipe": repr(recipe)}, ["hf/config.json"], train)
        calib = args.calib or [str(hf_dir / "calib.txt")]
        eval_text = args.eval_text or str(hf_dir / "eval.txt")

    model_dir = out / "model"

    def convert():
        r = convert_hf(hf_dir, model_dir, dtype="fp32", force=True, progress=True)
        return {"params": r.num_params, "peak_rss_mib": round(r.peak_rss_bytes / 2**20, 1)}

    st.run("convert", {}, ["model/model.json"], convert)

    seq = ["--seqlen", str(args.seqlen), "--nsamples", str(args.nsamples)]
    st.run("trace", {"calib": calib, "seq": seq}, ["trace.json"], lambda: _cli(
        ["trace", "--model", str(model_dir), "--text", *calib, "--out", str(out / "trace.json"),
         "--plot", str(out / "trace.png"), *seq, "--force"]))
    schemes = args.schemes or (ACT_SCHEMES if args.abits else WEIGHT_ONLY_SCHEMES)
    # --devices joins a stage's settings only when it is not 1: earlier run folders still resume
    par = ["--devices", str(args.devices)] if args.devices != 1 else []
    st.run("calibrate", {"schemes": schemes, "method": args.method} | ({"par": par} if par else {}),
           ["loss.json"], lambda: _cli(
        ["calibrate", "--model", str(model_dir), "--text", *calib, "--schemes", *schemes,
         "--method", args.method, "--out", str(out / "loss.json"), *seq, *par, "--force"]))
    measured = _gpu_kind()
    how = {"device": measured or args.device, "measured": bool(measured)}
    st.run("profile", how, ["perf.json"], lambda: _profile(
        args.device, measured, str(model_dir), schemes, model_dir, out / "perf.json"))
    budget = ["--wbits", str(args.wbits)] + (["--abits", str(args.abits)] if args.abits else [])

    r = args.r if args.r is not None else (0.75 if args.abits else 1.0)

    def solve():
        summary = _solve(out, "", budget + par, args.batch, r)
        return {k: summary[k] for k in ("wbits", "abits", "L", "T_us") if k in summary}

    st.run("solve", {"budget": budget, "batch": args.batch, "r": r} | ({"par": par} if par else {}),
           ["qconfig.json"], solve)
    gptq = ["--calib", *calib, "--calib-windows", str(args.nsamples), "--seqlen",
            str(args.seqlen)] if args.method == "gptq" else []
    st.run("quantize", {"method": args.method}, ["qmodel/qmodel.json"], lambda: _cli(
        ["quantize", "--model", str(model_dir), "--qconfig", str(out / "qconfig.json"),
         "--method", args.method, *gptq, "--out", str(out / "qmodel"), "--force"]))
    st.run("eval", {"eval": eval_text, "seqlen": args.seqlen, "windows": args.max_windows},
           [], lambda: _evaluate(args, model_dir, calib, eval_text, schemes, out))
    on_gpu = jax.devices()[0].platform == "gpu"

    def bench():
        if not on_gpu:
            return {"skipped": f"no NVIDIA GPU here (JAX device: {jax.devices()[0].platform}); "
                               "layer speed is measured on GPUs only"}
        _cli(["bench", "--model", str(out / "qmodel"), "--out", str(out / "bench"),
              "--tokens", *map(str, args.bench_tokens), "--force"])
        rows = json.loads((out / "bench" / "bench.json").read_text())["rows"]
        return {"rows": rows}

    st.run("bench", {"tokens": args.bench_tokens, "gpu": on_gpu},
           ["bench/bench.json"] if on_gpu else [], bench)
    if args.shapes_of:  # last: no stage before depends on it
        st.run(f"solve at {args.shapes_of} shapes", {"preset": args.shapes_of},
               [f"qconfig-{args.shapes_of}.json"],
               lambda: _solve_at_preset(args, out, schemes, budget, r))

    write_atomic(out / "report.json", json.dumps(report, indent=2))
    table = _tables(report)
    write_atomic(out / "report.md", table + "\n")
    print(table)
    return 0


def _solve_at_preset(args, out: Path, schemes, budget, r) -> dict:
    """trace and loss scaled to the preset (``alloc.scale``), its analytic perf table, solve."""
    from mxmoe_jax.alloc.scale import scale_loss, scale_trace
    from mxmoe_jax.jsonio import read_json, write_json_atomic
    from mxmoe_jax.perf.shapes import PRESETS

    preset = PRESETS[args.shapes_of]
    trace = read_json(out / "trace.json", "trace")
    loss = read_json(out / "loss.json", "loss table")
    tag = args.shapes_of
    write_json_atomic(out / f"trace-{tag}.json", scale_trace(trace, preset))
    write_json_atomic(out / f"loss-{tag}.json", scale_loss(loss, trace, preset))
    _profile(args.device, _gpu_kind(), tag, schemes, tag, out / f"perf-{tag}.json")
    summary = _solve(out, f"-{tag}", budget, args.batch, r)
    return {"preset": tag, "mixed": {k: summary[k] for k in ("wbits", "abits", "L", "T_us")},
            "uniform": summary.get("uniform", {}), "perf": summary.get("perf")}


RUN_PROFILE_TOKENS = ("1", "16", "256", "4096")


def _gpu_kind() -> str | None:
    from mxmoe_jax.perf.profile import current_device

    return current_device()


def _profile(device: str, measured: str | None, shapes: str, schemes, shapes_of, out: Path):
    """``profile`` of ``shapes`` for w16a16 and ``schemes``: measured on this NVIDIA GPU
    (``measured`` = its name), else the analytic roofline of ``device``; returns the summary."""
    # measured: a short grid of tokens per expert (each point compiles its own kernel)
    how = ["--tokens", *RUN_PROFILE_TOKENS] if measured else ["--analytic", device]
    _cli(["profile", *how, "--shapes", shapes, "--schemes", "w16a16",
          *_with_substitutes(schemes, shapes_of), "--out", str(out), "--force"])
    if measured:
        return {"source": f"measured on this {measured} (mxmoe-jax profile)"}
    return {"source": f"analytic roofline of the {device} (no NVIDIA GPU here to measure on)"}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# g128 where it divides a block's K; elsewhere (the tiny models' down_proj, K = 192) calibrate,
# solve and quantize all use the group size `QScheme.for_k` substitutes (g96 there).
WEIGHT_ONLY_SCHEMES = ("w2a16_g128_asym", "w3a16_g128_asym", "w4a16_g128_asym", "w8a16_g-1_asym")
ACT_SCHEMES = ("w4a4_g-1_sym", "w4a4_g128_sym", "w8a8_g-1_sym")


def _solve(out: Path, suffix: str, budget, batch: int, r: float) -> dict:
    """``solve`` on ``trace{suffix}.json``, ``loss{suffix}.json``, ``perf{suffix}.json`` in ``out``
    into ``qconfig{suffix}.json``; its summary."""
    def f(stem):
        return str(out / f"{stem}{suffix}.json")

    _cli(["solve", "--trace", f("trace"), "--loss", f("loss"), "--perf", f("perf"), *budget,
          "--batch", str(batch), "--r", str(r), "--out", f("qconfig"), "--force"])
    return json.loads((out / f"qconfig{suffix}.json").read_text())["summary"]


def _with_substitutes(schemes, shapes) -> list[str]:
    """``schemes`` plus what each is in the GEMMs of ``shapes`` (a model folder or a
    ``perf.shapes`` preset; ``QScheme.for_k`` of every K): solve times a block with the scheme it is
    quantized with, so perf.json needs those too."""
    from mxmoe_jax.perf.shapes import load_shapes
    from mxmoe_jax.quant.scheme import QScheme

    ks = sorted({k for _, k in load_shapes(str(shapes)).gemms()})
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
    from mxmoe_jax.quantize.checkpoint import load_any
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
    rows[f"mixed (solve, {args.wbits} bits)"] = (qconfig["summary"]["wbits"], "qmodel")
    result = {"text": eval_text, "windows": int(ids.shape[0]), "ppl": {}}
    for name, (bits, allocation) in rows.items():
        if allocation == "qmodel":  # the QMODEL_DIR of the quantize stage, as users load it
            m = load_any(out / "qmodel", dtype=jnp.float32)[1]
        else:
            m = model if allocation is None else quantize_in_memory(
                model, allocation, config, tokenizer_dir=model_dir)[0]
        ppl = perplexity(lambda batch, m=m: forward(m, batch), ids).ppl
        result["ppl"][name] = {"wbits": round(bits, 3), "ppl": round(ppl, 4)}
        print(f"  {name:<32} wbits {bits:6.3f}  ppl {result['ppl'][name]['ppl']}", flush=True)
    return result


def _tables(report: dict) -> str:
    stages = report["stages"]
    lines = ["# mxmoe-jax run", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {r['seconds']}{' (reused)' if r.get('reused') else ''} |"
              for name, r in stages.items()]
    prof = (stages.get("profile", {}).get("result") or {}).get("source")
    if prof:
        lines += ["", f"Kernel times in the allocation: {prof}."]
    ev = stages["eval"]["result"]
    lines += ["", f"Perplexity on {ev['text']} ({ev['windows']} windows); uniform schemes are "
              "quantized in memory, the mixed allocation is the QMODEL_DIR `qmodel/`:", "",
              "| model | avg weight bits | ppl |", "|---|---|---|"]
    lines += [f"| {k} | {v['wbits']} | {v['ppl']} |" for k, v in ev["ppl"].items()]
    lines += ["", "Expert load: ![trace](trace.png)", "",
              "Pareto frontier (the chosen allocation and the uniform schemes): "
              "![frontier](qconfig.frontier.png)", "",
              "Allocation: ![heatmap](qconfig.heatmap.png)"]
    pre = next((r.get("result") for name, r in stages.items() if name.startswith("solve at ")),
               None)
    if pre:
        tag = pre["preset"]
        lines += ["", f"### At the {tag} layer shapes", "",
                  f"Accuracy comes from this model; speed from the {tag} shapes "
                  f"({pre.get('perf')}): its trace and loss pattern scaled to {tag} "
                  f"(`trace-{tag}.json`, `loss-{tag}.json`, `mxmoe_jax.alloc.scale`), solved at "
                  "the same budget. L is the solver's loss proxy on the scaled table, T the "
                  "predicted time of all MoE layers at --batch tokens.", "",
                  "| allocation | avg weight bits | L | T (µs) |", "|---|---|---|---|"]
        m = pre["mixed"]
        lines.append(f"| mixed | {m['wbits']:.3f} | {m['L']:.4g} | {m['T_us']:.1f} |")
        lines += [f"| {k} | {v['wbits']:.3f} | {v['L']:.4g} | {v['T_us']:.1f} |"
                  for k, v in pre["uniform"].items()]
        lines += ["", f"![frontier at {tag}](qconfig-{tag}.frontier.png)"]
    b = stages.get("bench", {}).get("result") or {}
    if b.get("skipped"):
        lines += ["", f"Layer speed: not measured: {b['skipped']}."]
    elif b.get("rows"):
        lines += ["", "Layer speed (device µs, `bench/bench.json`): ![bench](bench/bench.png)", "",
                  "| layer | tokens | variant | device µs |", "|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['tokens']} | {r['variant']} | {r['us']} |"
                  for r in b["rows"]]
    return "\n".join(lines)
