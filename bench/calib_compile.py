"""Compile vs run time of GPTQ and of `calibrate` on this device, with a cProfile of calibrate.

On the H200 (JAX 0.11.2) nearly all of calibrate's time on the tiny model is XLA compilation
(`bench/results/calib_compile-2026-12-01T1615Z-h200.log`):

    PYTHONPATH=. python -m bench.calib_compile   # ../shared (or .gpu-data/shared) beside it
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from mxmoe_jax.convert.hf_to_flax import convert_hf

from mxmoe_jax.calib import calibrate as C
from mxmoe_jax.data import load_tokenizer, token_windows, tokenize_texts
from mxmoe_jax.models.io import load_model_dir
from mxmoe_jax.quant.gptq import gptq_quantize

SHARED = "../shared" if os.path.isdir("../shared") else ".gpu-data/shared"


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gptq_times(rng) -> None:
    """First (compile + run) and second call of one layer's GPTQ, per shape and scheme."""
    for e, k, n in ((16, 256, 384), (16, 192, 256), (1, 768, 256)):
        w = jnp.asarray(rng.normal(0, 0.05, (e, k, n)).astype(np.float32))
        x = rng.normal(0, 1, (e, 512, k)).astype(np.float32)
        h = jnp.asarray(np.einsum("emk,eml->ekl", x, x) / 512)
        for s in ("w3a16_g64_asym", "w4a16_g-1_asym"):
            def one(s=s, w=w, h=h):
                gptq_quantize(w, h, s).codes.block_until_ready()
            t1, t2 = _timed(one), _timed(one)
            print(f"gptq {e}x{k}x{n} {s}: first {t1:.2f} s, second {t2:.3f} s", flush=True)


def calibrate_times() -> None:
    """calibrate (RTN, GPTQ, GPTQ again) of one layer of the tiny model, profiled."""
    d = tempfile.mkdtemp() + "/model"
    convert_hf(SHARED + "/models/qwen2moe-tiny-books", d, "fp32")
    _, model = load_model_dir(d, dtype=jnp.float32)
    ids = tokenize_texts(load_tokenizer(d), [SHARED + "/data/books-calib.txt"])
    windows = np.asarray(token_windows(ids, seqlen=64, nsamples=2, seed=0))
    kw = dict(schemes=("w3a16_g64_asym",), layers=(2,), batch_tokens=128)
    for method in ("rtn", "gptq", "gptq"):
        prof = cProfile.Profile()
        config = C.CalibConfig(method=method, **kw)
        prof.enable()
        took = _timed(lambda config=config: C.calibrate(model, windows, config, meta={}))
        prof.disable()
        print(f"calibrate {method}: {took:.1f} s", flush=True)
        for key, n in (("cumulative", 25), ("tottime", 12)):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
            print(s.getvalue()[-6000:], flush=True)


if __name__ == "__main__":
    gptq_times(np.random.default_rng(0))
    calibrate_times()
