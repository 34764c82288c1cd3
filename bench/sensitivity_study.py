"""`solve --sensitivity` measured: the allocation with calibrate-time layer weights vs uniform.

On ``qwen2moe-tiny-books`` with GPTQ, in the work folder of `bench/proxy_study.py` (its model,
trace, GPTQ loss.json and perf.json, and its measured.jsonl cache): `mxmoe-jax sensitivity` on
books-calib (16 × 512, reference w2a16_g-1_asym), then per budget `mxmoe-jax solve --mode model
--r 1 --proxy squared --sensitivity`, each allocation quantized by GPTQ and evaluated on
books-eval (16 × 512), beside uniform at the same bits.

Run: ``python -m bench.sensitivity_study --work DIR [--budgets 2.5 3.5]``; writes
``bench/results/sensitivity_study-<date>-cpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

from bench.proxy_study import (
    SCHEMES,
    SHARED,
    UNIFORM_AT,
    Lab,
    run_cli,
    setup,
    study_inputs,
    uniform,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, default=Path("/tmp/mxmoe-proxy-study"))
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3.5])
    p.add_argument("--granularity", nargs="+", default=["linear"], choices=("linear", "expert"))
    p.add_argument("--baseline", action="store_true",
                   help="also measure the same solve without --sensitivity (the comparison)")
    p.add_argument("--seeds", type=int, nargs="+", default=[42],
                   help="GPTQ calibration seeds each allocation is quantized with")
    args = p.parse_args()
    model = SHARED / "models" / "qwen2moe-tiny-books"
    calib, eval_text = SHARED / "data" / "books-calib.txt", SHARED / "data" / "books-eval.txt"
    setup(args.work, model, calib, eval_text)
    sens = args.work / "sensitivity.json"
    if not sens.exists():
        run_cli(["sensitivity", "--model", str(args.work / "model"), "--text", str(calib),
                 "--seqlen", "512", "--nsamples", "16", "--out", str(sens)])
    lab = Lab(args.work, calib, eval_text, 16)
    inputs = study_inputs(args.work)
    fp = lab.measure("fp", uniform(inputs, "w16a16"))["ppl"]
    rows = []
    for b in args.budgets:  # one row per (budget, variant): ppl per seed
        uni = [lab.measure(f"uniform {UNIFORM_AT[b]}", uniform(inputs, UNIFORM_AT[b]),
                           seed=seed)["ppl"] for seed in args.seeds]
        variants = [(gran, True) for gran in args.granularity]
        variants += [("linear", False)] if args.baseline else []
        for gran, weighted in variants:
            q = args.work / f"q-sens-{b}-{gran}-{int(weighted)}.json"
            run_cli(["solve", "--trace", str(args.work / "trace.json"), "--loss",
                     str(args.work / "loss.json"), "--perf", str(args.work / "perf.json"),
                     "--wbits", str(b), "--r", "1", "--mode", "model", "--proxy", "squared",
                     "--granularity", gran, "--schemes", *SCHEMES, "--hull", "0", "--no-plots",
                     "--out", str(q), "--force",
                     *(["--sensitivity", str(sens)] if weighted else [])])
            layers = json.loads(q.read_text())["layers"]
            name = (("sensitivity model" if weighted else "squared model")
                    + ("" if gran == "linear" else f" {gran}") + f" {b}")
            mixed = [lab.measure(name, layers, seed=seed)["ppl"] for seed in args.seeds]
            removed = [(u - m) / (u - fp) for u, m in zip(uni, mixed, strict=True)]
            rows.append(dict(budget=b, granularity=gran, sensitivity=weighted,
                             uniform_scheme=UNIFORM_AT[b],
                             seeds=args.seeds, uniform=uni, mixed=mixed, removed=removed))
            print(f"{b} bits, {gran}, sensitivity={weighted}: uniform {UNIFORM_AT[b]} {uni}, "
                  f"solve {mixed} "
                  f"(removed {[round(100 * r) for r in removed]}% of uniform's increase over "
                  f"FP {fp:.2f})", flush=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    out = Path(__file__).parent / "results" / f"sensitivity_study-{stamp}-cpu.json"
    import jax

    out.write_text(json.dumps(dict(date=stamp, device=platform.processor() or "cpu",
                                   jax=jax.__version__, fp=fp,
                                   sensitivity=json.loads(sens.read_text()), rows=rows),
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
