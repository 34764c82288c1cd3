"""Run in a subprocess with 8 simulated CPU devices (see ``ep_check.py``): calibration's per-chunk
Δ² and MoE output with the routed experts sharded (``calib.sharded.ShardedChunkLosses``) against
the single-device ``calibrate._chunk_losses`` on the same chunk and variants.

Prints one JSON line per (routing, devices): the largest differences and magnitudes of Δ² and of
the output, and the experts' loads; ``test_sharded_calib.py`` judges them.
"""

from __future__ import annotations

import json
import sys

import jax.numpy as jnp
import numpy as np

from mxmoe_jax.calib import calibrate, walk
from mxmoe_jax.calib.sharded import ShardedChunkLosses
from mxmoe_jax.models import moe
from mxmoe_jax.parallel import expert_mesh
from mxmoe_jax.quant.scheme import QScheme
from tests.parallel.ep_check import E, T, make_block, routing_case

# a weight-only and a weight-activation scheme; g16 does not divide the down K (12): two parts
SCHEMES = ("w4a16_g-1_asym", "w8a8_g16_sym")
PAD = 8  # the chunk's last PAD tokens are padding (mask 0)


def main(device_counts: list[int]) -> None:
    rng = np.random.default_rng(0)
    block = make_block(jnp.float32)
    parts = calibrate._scheme_parts(block, [QScheme.parse(s) for s in SCHEMES])
    variants = calibrate._quantize_layer(block, parts, calibrate.QUANTIZERS["rtn"], None)
    for case in ("random", "empty_expert", "all_to_one"):
        x = routing_case(block, case, rng)
        x = x.at[T - PAD:].set(0.0)
        mask = jnp.asarray(np.r_[np.ones(T - PAD), np.zeros(PAD)], jnp.float32)
        capacity = walk.chunk_capacity(block, x)
        ref_sq, ref_out = (np.asarray(a, np.float64) for a in
                           calibrate._chunk_losses(block, x, mask, variants, capacity=capacity))
        idx, _ = moe.route(block.router_logits(x), block.cfg)
        loads = np.bincount(np.asarray(idx).reshape(-1), minlength=E).tolist()
        for n in device_counts:
            sq, out = ShardedChunkLosses(block, variants, expert_mesh(n))(x, mask,
                                                                          capacity=capacity)
            sq, out = np.asarray(sq, np.float64), np.asarray(out, np.float64)
            print(json.dumps(dict(
                case=case, devices=n, parts=len(parts), shape=list(sq.shape),
                ref_shape=list(ref_sq.shape),
                sq_err=float(np.abs(sq - ref_sq).max()), sq_scale=float(np.abs(ref_sq).max()),
                sq_rel=float(np.max(np.abs(sq - ref_sq) / np.maximum(np.abs(ref_sq), 1e-30))),
                sq_zero_match=bool(np.array_equal(sq == 0, ref_sq == 0)),
                out_err=float(np.abs(out - ref_out).max()),
                out_scale=float(np.abs(ref_out).max()), loads=loads)), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2, 4, 8])
