"""Perplexity of one QMODEL_DIR through every expert-GEMM path: the Pallas kernels vs the reference.

``python -m bench.qmodel_ppl --model MODEL_DIR --qconfig Q.json [--hadamard] [--method rtn|gptq]
[--calib F] --text EVAL.txt [--seqlen 512] [--max-windows 16] --out bench/results``

Quantizes MODEL_DIR once into a QMODEL_DIR (``mxmoe_jax.quantize``), reloads it, and evaluates the
same QMODEL_DIR with ``impl=reference`` in fp32 (the fake-quant reference), ``impl=reference`` in
bf16 and, on an NVIDIA GPU, ``impl=kernel`` in bf16 (the Pallas kernels: one mixed-precision
launch per projection). Prints a table and writes ``qmodel_ppl-<date>.json`` (date, device, JAX
version).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    from mxmoe_jax.data import load_tokenizer, tokenize_texts, whole_windows
    from mxmoe_jax.eval.perplexity import perplexity
    from mxmoe_jax.models import forward
    from mxmoe_jax.ops import kernel_mode
    from mxmoe_jax.quantize.checkpoint import load_qmodel
    from mxmoe_jax.quantize.pipeline import QuantizeConfig, quantize_dir

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--qconfig", required=True)
    ap.add_argument("--hadamard", action="store_true")
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--calib", nargs="*", default=())
    ap.add_argument("--text", required=True)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    with tempfile.TemporaryDirectory() as tmp:
        qdir = Path(tmp) / "qmodel"
        manifest = quantize_dir(args.model, qdir, qconfig=args.qconfig, config=QuantizeConfig(
            method=args.method, hadamard=args.hadamard, calib=tuple(args.calib)))
        ids = whole_windows(tokenize_texts(load_tokenizer(qdir), [args.text]), args.seqlen,
                            args.max_windows)
        rows = {}
        paths = [("reference", jnp.float32), ("reference", jnp.bfloat16)]
        if on_gpu:
            paths.append(("kernel", jnp.bfloat16))
        for impl, dtype in paths:
            _, model, _, _ = load_qmodel(qdir, dtype=dtype)
            with kernel_mode(impl):
                ppl = perplexity(lambda b, m=model: forward(m, b), ids).ppl
            rows[f"{impl} {jnp.dtype(dtype).name}"] = ppl
            print(f"{impl:>10} {jnp.dtype(dtype).name:>9}  ppl {ppl:.6f}", flush=True)
    ref16 = rows["reference bfloat16"]
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "args": vars(args), "bytes": manifest["bytes"], "ppl": rows,
              "rel_kernel_vs_reference_bf16": (abs(rows["kernel bfloat16"] - ref16) / ref16
                                               if on_gpu else None)}
    print(json.dumps({k: result[k] for k in ("device", "ppl", "rel_kernel_vs_reference_bf16")}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H%MZ")
    (out / f"qmodel_ppl-{stamp}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
