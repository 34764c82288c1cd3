"""Run in a subprocess with N simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_
device_count=8``, which must be set before JAX starts): the expert-parallel MoE layer
(``mxmoe_jax.parallel``) against the single-device ``models.moe.moe_forward`` on the same inputs.

``python -m tests.parallel.ep_check`` prints one JSON line per (weights, routing, devices) with
the largest absolute difference, the reference's largest magnitude, the experts' loads under the
routing and the filler slots, for ``test_expert_parallel.py`` to judge. Nothing is judged here.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mxmoe_jax.config import ModelConfig
from mxmoe_jax.models import moe
from mxmoe_jax.ops import kernel_mode
from mxmoe_jax.parallel import ExpertParallelMoE, Placement, expert_mesh
from mxmoe_jax.quant.packing import pack
from mxmoe_jax.quant.rtn import quantize_rtn
from mxmoe_jax.quant.scheme import W16A16, QScheme

E, D, F, K, T = 8, 16, 12, 2, 40  # experts, hidden, expert intermediate (ffn), top-k, tokens
# per expert: the gate_up scheme and the down scheme (None: w16a16 with bf16 values); several
# schemes on each device of 2, uneven per device of 4 and 8, so filler slots appear
GATE_UP = ["w4a16_g-1_asym", "w8a8_g-1_sym", None, "w4a16_g-1_asym",
           "w8a8_g-1_sym", "w4a16_g-1_asym", "w4a16_g-1_asym", None]
DOWN = ["w8a8_g-1_sym", "w8a8_g-1_sym", None, "w4a16_g-1_asym",
        "w4a16_g-1_asym", None, "w4a16_g-1_asym", "w8a8_g-1_sym"]


def make_block(dtype) -> moe.MoEBlock:
    cfg = ModelConfig(model_type="qwen2_moe", vocab_size=32, hidden_size=D, num_layers=1,
                      num_heads=2, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6,
                      rope_theta=10000.0, num_experts=E, num_experts_per_tok=K,
                      moe_intermediate_size=F, intermediate_size=24,
                      shared_intermediate_size=10, shared_expert_gate=True)
    block = moe.MoEBlock(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(1))
    for name in ("gate", "up", "down"):  # weights large enough that experts matter
        p = getattr(block.experts, name)
        p[...] = p[...] * 20
    return block


def mixed_weights(block: moe.MoEBlock, gate_up: list, down: list) -> moe.ExpertWeights:
    """The block's experts quantized per expert (RTN, packed; None: bf16-valued w16a16)."""
    full = {"gate_up": jnp.concatenate([block.experts.gate[...], block.experts.up[...]], -1),
            "down": block.experts.down[...]}
    groups = {}
    for proj, names in (("gate_up", gate_up), ("down", down)):
        out = []
        for name in sorted(set(names), key=str):
            experts = tuple(e for e in range(E) if names[e] == name)
            w = full[proj][np.asarray(experts)]
            if name is None:
                out.append(moe.SchemeGroup(w=w.astype(jnp.bfloat16).astype(w.dtype),
                                           experts=experts, scheme=W16A16))
            else:
                out.append(moe.SchemeGroup(w=pack(quantize_rtn(w, name)), experts=experts,
                                           scheme=QScheme.parse(name)))
        groups[proj] = tuple(out)
    return moe.ExpertWeights(gate_up=groups["gate_up"], down=groups["down"], num_experts=E)


def shared_weights(block: moe.MoEBlock, name: str) -> moe.ExpertWeights:
    """The shared expert quantized with ``name`` (a stack of one, packed)."""
    s = block.shared
    gate_up = jnp.concatenate([s.gate_proj.kernel[...], s.up_proj.kernel[...]], -1)[None]
    down = s.down_proj.kernel[...][None]
    scheme = QScheme.parse(name)
    return moe.ExpertWeights(
        gate_up=(moe.SchemeGroup(w=pack(quantize_rtn(gate_up, name)), experts=(0,),
                                 scheme=scheme),),
        down=(moe.SchemeGroup(w=pack(quantize_rtn(down, name)), experts=(0,), scheme=scheme),),
        num_experts=1)


def routing_case(block: moe.MoEBlock, case: str, rng) -> jax.Array:
    """Inputs (and router weights) for a routing case; feature 0 of every token is 4."""
    x = rng.normal(size=(T, D)).astype(np.float32)
    x[:, 0] = 4.0
    w = rng.normal(size=(D, E)).astype(np.float32) * 2
    w[0] = 0.0
    if case == "empty_expert":  # expert 5 is never chosen
        w[0, 5] = -100.0
    elif case == "all_to_one":  # every token picks expert 6 first and expert 1 second
        w[0, 6], w[0, 1] = 100.0, 60.0
    block.router.kernel[...] = jnp.asarray(w, block.router.kernel[...].dtype)
    return jnp.asarray(x, block.dtype)


def main(device_counts: list[int]) -> None:
    rng = np.random.default_rng(0)
    ref_fn = nnx.jit(lambda b, v, r, s: moe.moe_forward(b, v, routed=r, shared=s))
    for weights in ("bf16", "mixed"):
        block = make_block(jnp.bfloat16 if weights == "bf16" else jnp.float32)
        routed, shared = block.experts.weights(), None
        if weights == "mixed":  # and the shared expert in w8a8
            routed = mixed_weights(block, GATE_UP, DOWN)
            shared = shared_weights(block, "w8a8_g-1_sym")
        placements = {f"contiguous{n}": (n, None) for n in device_counts}
        if weights == "mixed":  # on 4 devices, experts dealt round-robin by scheme pair
            placements["by_kind4"] = (4, Placement.by_kind(routed, 4))
        for case in ("random", "empty_expert", "all_to_one"):
            x = routing_case(block, case, rng)
            ref = np.asarray(ref_fn(block, x, routed, shared), np.float32)
            idx, _ = moe.route(block.router_logits(x), block.cfg)
            loads = np.bincount(np.asarray(idx).reshape(-1), minlength=E).tolist()
            for name, (n, placement) in placements.items():
                ep = ExpertParallelMoE(block, expert_mesh(n), placement=placement, routed=routed,
                                       shared=shared)
                got = np.asarray(ep(x), np.float32)
                leaf = jax.tree.leaves(ep.experts)[0]  # a sharded weight: rows on each device
                print(json.dumps(dict(weights=weights, case=case, placement=name, devices=n,
                                      err=float(np.abs(got - ref).max()),
                                      scale=float(np.abs(ref).max()), loads=loads,
                                      shape=list(got.shape), filler=ep.experts.filler_slots,
                                      weight_devices=len(leaf.sharding.device_set),
                                      weight_rows=[int(leaf.shape[0]), int(
                                          leaf.addressable_shards[0].data.shape[0])])),
                      flush=True)


def main_interpret(device_counts: list[int]) -> None:
    """The mixed bf16 layer on the Pallas kernels (interpret mode) inside ``shard_map`` against
    the single-device forward on the same kernels."""
    rng = np.random.default_rng(0)
    block = make_block(jnp.bfloat16)
    routed = mixed_weights(block, GATE_UP, DOWN)
    with kernel_mode("interpret"):
        ref_fn = nnx.jit(lambda b, v, r: moe.moe_forward(b, v, routed=r))
        for case in ("random", "all_to_one"):
            x = routing_case(block, case, rng)
            ref = np.asarray(ref_fn(block, x, routed), np.float32)
            for n in device_counts:
                ep = ExpertParallelMoE(block, expert_mesh(n), routed=routed)
                got = np.asarray(ep(x), np.float32)
                print(json.dumps(dict(weights="mixed-bf16-interpret", case=case, devices=n,
                                      err=float(np.abs(got - ref).max()),
                                      scale=float(np.abs(ref).max()))), flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--interpret"]:
        main_interpret([int(a) for a in args[1:]] or [2])
    else:
        main([int(a) for a in args] or [2, 4, 8])
