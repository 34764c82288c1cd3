"""Expert load by text domain (the original's Fig. 1): prose (WikiText-2) vs code (Python).

``python -m bench.trace_domains --model MODEL_DIR [--wiki FILE] [--code FILE...] [--out DIR]``

Traces the model on WikiText-2 and on Python source that ships with the interpreter (the
standard library's own ``.py`` files, concatenated; no download), writes both ``trace.json``
files, a side-by-side heatmap (layers x experts, % of routed tokens) and a JSON summary per layer:
the busiest expert's share, the max/min load ratio, and how far the two domains' load vectors
are apart (total variation distance: 0 = same load, 1 = disjoint experts). The last stdout line
is the summary JSON.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from mxmoe_jax.calib.trace import expert_share, plot_traces, trace_files
from mxmoe_jax.jsonio import write_json_atomic

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.test.raw.txt"


def stdlib_code(max_bytes: int = 2_000_000) -> str:
    """The first ``max_bytes`` of the standard library's top-level ``.py`` files, sorted by name."""
    parts, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n\n".join(parts)


def summary(traces: dict[str, dict]) -> dict:
    shares = {name: expert_share(t) / 100.0 for name, t in traces.items()}  # [L, E] fractions
    names = list(traces)
    layers = traces[names[0]]["moe_layers"]
    out = {"layers": layers, "per_domain": {}, "tv_distance": []}
    for name, s in shares.items():
        out["per_domain"][name] = {
            "top1_share": [round(float(r.max()), 4) for r in s],
            "max_min_ratio": [round(float(r.max() / max(r.min(), 1e-9)), 1) for r in s],
        }
    a, b = shares[names[0]], shares[names[1]]
    out["tv_distance"] = [round(float(0.5 * np.abs(x - y).sum()), 4)
                          for x, y in zip(a, b, strict=True)]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="MODEL_DIR (e.g. the tiny model converted)")
    ap.add_argument("--wiki", default=str(WIKI), help="prose text (default: WikiText-2 test)")
    ap.add_argument("--code", nargs="*", help="code text files (default: the stdlib's .py files)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--out", default="bench/results", help="folder for the PNG and JSON files")
    args = ap.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        code = args.code
        if not code:
            code = [str(Path(tmp) / "stdlib_code.py.txt")]
            Path(code[0]).write_text(stdlib_code(), encoding="utf-8")
        kw = dict(seqlen=args.seqlen, nsamples=args.nsamples, progress=True)
        traces = {"WikiText-2": trace_files(args.model, [args.wiki], **kw),
                  "Python stdlib": trace_files(args.model, code, **kw)}
    write_json_atomic(out / "trace_wikitext2.json", traces["WikiText-2"])
    write_json_atomic(out / "trace_code.json", traces["Python stdlib"])
    titles = [f"{k} ({t['num_samples']} x {t['num_tokens']} tokens)" for k, t in traces.items()]
    png = plot_traces(list(traces.values()), titles, out / "trace_wiki_vs_code.png")
    result = summary(traces)
    write_json_atomic(out / "trace_domains.json", result)
    print(f"{'layer':>5} " + " ".join(f"{k + ' top1':>20} {'max/min':>8}" for k in traces)
          + f" {'TV dist':>8}")
    for j, i in enumerate(result["layers"]):
        row = " ".join(f"{100 * result['per_domain'][k]['top1_share'][j]:>19.1f}% "
                       f"{result['per_domain'][k]['max_min_ratio'][j]:>8}" for k in traces)
        print(f"{i:>5} {row} {result['tv_distance'][j]:>8}")
    print(f"wrote {png}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
