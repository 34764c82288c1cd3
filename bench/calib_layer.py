"""Calibration of one MoE layer: seconds per scheme for Δ of every (expert, block).

``python -m bench.calib_layer [--small] [--schemes w4a16_g128_asym ...] [--method rtn|gptq]``

Default shape: a Qwen1.5-MoE-A2.7B MoE layer (60 routed experts, top-4, hidden 2048,
moe_intermediate 1408, shared expert 5632 with its sigmoid gate), random normal weights (std
0.02) and random normal MoE-block inputs, 128 x 4096 calibration tokens: the original's
calibration set. The layer is run through the real driver step (``calibrate._layer_out_norm``:
host-resident activations streamed in ``--batch-tokens`` chunks, the model's MoE forward in the
padded layout with its intermediates captured, quantization of all experts, Δ² accumulation, the
FP layer output for the next layer).

Timing: the whole layer is run once to compile every chunk shape, then timed again; the second
run's host wall-clock around a blocking device->host read of the results is the time (one call per
chunk, each a multi-millisecond job, so dispatch overhead is small; compile excluded). The last
stdout line is JSON (also written to ``--out``). ``--small``: a CPU-sized layer (16 experts,
hidden 256, moe_intermediate 192, shared 768, 4 x 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from bench.model_layer import layer_shape
from mxmoe_jax.calib import calibrate as C
from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models import MoEBlock
from mxmoe_jax.quant.scheme import QScheme

QWEN15 = dict(layer_shape("qwen1.5-moe"), windows=128, seqlen=4096)
SMALL = dict(hidden=256, experts=16, topk=4, inter=192, shared=768, windows=4, seqlen=512)


def qwen_config(shape: dict) -> ModelConfig:
    """A qwen2_moe config with the layer shape (only routing fields matter here)."""
    return ModelConfig.from_hf({
        "model_type": "qwen2_moe", "vocab_size": 1024, "hidden_size": shape["hidden"],
        "num_hidden_layers": 1, "num_attention_heads": 16, "num_key_value_heads": 16,
        "intermediate_size": 4 * shape["inter"], "moe_intermediate_size": shape["inter"],
        "shared_expert_intermediate_size": shape["shared"], "num_experts": shape["experts"],
        "num_experts_per_tok": shape["topk"], "norm_topk_prob": False, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "max_position_embeddings": shape["seqlen"],
        "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": True})


def random_block(cfg: ModelConfig, seed: int) -> MoEBlock:
    """The model's MoE block (fp32) with its random normal init (std 0.02)."""
    return MoEBlock(cfg, rngs=nnx.Rngs(seed))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized layer")
    ap.add_argument("--schemes", nargs="+", default=["w4a16_g128_asym"])
    ap.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="tokens per jitted chunk")
    ap.add_argument("--tokens", type=int, help="override the calibration token count")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)

    shape = SMALL if args.small else QWEN15
    cfg = qwen_config(shape)
    block = random_block(cfg, seed=0)
    n_tokens = args.tokens or shape["windows"] * shape["seqlen"]
    rng = np.random.default_rng(0)
    # host-resident MoE inputs and residual, as the driver holds them between layers
    xn = rng.standard_normal((n_tokens, shape["hidden"]), dtype=np.float32)
    h = rng.standard_normal((n_tokens, shape["hidden"]), dtype=np.float32)
    schemes = [QScheme.parse(s) for s in args.schemes]
    quantize = C.QUANTIZERS[args.method]

    def run():
        start = time.perf_counter()
        sq, out = C._layer_out_norm(block, xn, h, schemes, quantize, args.batch_tokens,
                                    args.method, None)
        return time.perf_counter() - start, sq  # sq and out are host arrays: synchronised

    compile_run, _ = run()
    seconds, sq = run()
    delta = np.sqrt(sq)  # [S, E+1, 3]
    for k, s in enumerate(schemes):  # blocks the scheme cannot quantize (group size) -> nan
        delta[k][~np.array(C._supported(block, s))] = np.nan
    result = {
        "bench": "calib_layer", "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(), "jax_version": jax.__version__,
        "shape": shape, "tokens": n_tokens, "batch_tokens": args.batch_tokens,
        "method": args.method, "schemes": [s.name for s in schemes],
        "seconds": round(seconds, 3), "seconds_per_scheme": round(seconds / len(schemes), 3),
        "first_run_seconds_incl_compile": round(compile_run, 3),
        "mean_delta": {s.name: [round(float(v), 6) for v in np.nanmean(delta[k], axis=0)]
                       for k, s in enumerate(schemes)},
    }
    print(f"{result['device']}: {len(schemes)} scheme(s) x {shape['experts']}+1 experts x 3 "
          f"blocks over {n_tokens} tokens: {seconds:.2f} s "
          f"({seconds / len(schemes):.2f} s per scheme; first run incl. compile "
          f"{compile_run:.2f} s)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
